"""Config tree: defaults, YAML, dotted overrides, section shorthands, errors naming the key."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import yaml

from fastsd.config import TrainConfig, load_config, to_yaml


def test_defaults_and_group_size():
    cfg = load_config()
    assert cfg.condition == "critique" and cfg.group_size == 1
    assert load_config(overrides=["condition=grpo"]).group_size == 8
    assert load_config(overrides=["condition=grpo", "rollout.group_size=4"]).group_size == 4


def test_yaml_then_overrides(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("condition: reference\noptim:\n  lr: 1.0e-3\n  betas: [0.8, 0.9]\n"
                 "loss.divergence: forward_kl\nloss.clip: 0.05\n")
    cfg = load_config(str(f), ["optim.lr=5e-4", "teacher=ema", "model=/some/path", "loss=sampled_token"])
    assert cfg.condition == "reference"
    assert cfg.optim.lr == 5e-4 and cfg.optim.betas == (0.8, 0.9)
    assert cfg.loss.clip == 0.05 and cfg.loss.kind == "sampled_token" and cfg.loss.divergence == "forward_kl"
    assert cfg.teacher.kind == "ema" and cfg.model.path == "/some/path"


def test_auto_divergence_resolves_by_model():
    """auto: the paper's forward_kl, but reverse_kl for the built-in tiny model (docs/training.md)."""
    assert load_config().loss.divergence == "reverse_kl"
    assert load_config(overrides=["model=/some/path"]).loss.divergence == "forward_kl"
    assert load_config(overrides=["model=/some/path", "loss.divergence=jsd"]).loss.divergence == "jsd"
    assert load_config(overrides=["loss.divergence=forward_kl", "loss.clip=0.05"]).loss.clip == 0.05
    assert load_config(overrides=["loss.clip=0.05"]).loss.clip == 0.05  # clip with reverse_kl (auto here) too


def test_round_trip_through_yaml(tmp_path):
    cfg = load_config(overrides=["condition=grpo", "loss.clip=none", "eval.k=4", "model.liger=false"])
    f = tmp_path / "saved.yaml"
    f.write_text(to_yaml(cfg))
    assert load_config(str(f)) == cfg


@pytest.mark.parametrize("override,key", [
    ("nonsense=1", "nonsense"),
    ("optim.nonsense=1", "optim.nonsense"),
    ("nosection.lr=1", "nosection"),
    ("condition=sft", "condition"),
    ("optim.lr=fast", "optim.lr"),
    ("optim.lr=-1", "optim.lr"),
    ("steps=0", "steps"),
    ("steps=2.5", "steps"),
    ("model.liger=maybe", "model.liger"),
    ("loss.clip=0", "loss.clip"),
    ("loss.beta=1.01", "loss.beta"),
    ("loss.beta=-0.1", "loss.beta"),
    ("loss.is_clip=0", "loss.is_clip"),
    ("loss.is_clip=-2", "loss.is_clip"),
    ("rollout.top_p=0", "rollout.top_p"),
    ("teacher.ema_rate=1", "teacher.ema_rate"),
    ("templates=x", "templates"),
    ("optim.betas=[0.9]", "optim.betas"),
    ("noequals", "noequals"),
    ("optim.lr=inf", "optim.lr"),
    ("rollout.temperature=nan", "rollout.temperature"),
    ("optim.betas=[1.5,0.9]", "optim.betas"),
    ("optim.weight_decay=-1", "optim.weight_decay"),
    ("data.eval_size=0", "data.eval_size"),
    ("eval.batch_size=-1", "eval.batch_size"),
    ("data.train_size=0", "data.train_size"),
    ("loss.pg_clip=-1", "loss.pg_clip"),
    ("loss.topk=-1", "loss.topk"),
    ("loss.topk=2.5", "loss.topk"),
    ("loss.topk_from=both", "loss.topk_from"),
    ("loss.tail=maybe", "loss.tail"),
    ("templates.student={questoin}", "templates.student"),
    ("templates.critique=C:{critique", "templates.critique"),
    ("optim.lr=1e400", "optim.lr"),  # overflows to inf
])
def test_bad_values_name_the_key(override, key):
    extra = ["loss.divergence=jsd"] if key == "loss.clip" else []
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        load_config(overrides=extra + [override])


@pytest.mark.parametrize("overrides,key", [
    (["condition=grpo", "teacher=ema"], "teacher.kind"),
    (["condition=grpo", "loss=sampled_token"], "loss.kind"),
    (["condition=reference", "critic=http"], "critic.kind"),
    (["condition=grpo", "loss.topk=8"], "loss.topk"),
    (["condition=critique", "loss=sampled_token", "loss.topk=8"], "loss.topk"),
    (["condition=grpo", "loss.is_clip=2"], "loss.is_clip"),
])
def test_options_the_condition_ignores_are_said(overrides, key, caplog):
    """Said, not refused: tools such as compare_conditions pass one set of options to every condition."""
    with caplog.at_level("WARNING", logger="fastsd"):
        load_config(overrides=overrides)
    assert f"ignores {key}=" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="fastsd"):
        load_config(overrides=["condition=critique", "teacher=ema", "critic=http"])
    assert not caplog.text


def test_a_huge_integer_is_not_a_float_overflow():
    # Read as the integer it is (no float overflow), then refused as out of range, naming the key (issue 25).
    with pytest.raises(ValueError, match=r"^seed: 10000000000000000000\.\.\. \(401 characters\) is out of range"):
        load_config(overrides=["seed=1" + "0" * 400])


def test_clip_takes_any_divergence_with_or_without_topk():
    for div in ("reverse_kl", "jsd"):
        assert load_config(overrides=[f"loss.divergence={div}", "loss.clip=0.05"]).loss.clip == 0.05
        cfg = load_config(overrides=[f"loss.divergence={div}", "loss.clip=0.05", "loss.topk=8", "loss.tail=false"])
        assert (cfg.loss.clip, cfg.loss.topk, cfg.loss.topk_from, cfg.loss.tail) == (0.05, 8, "teacher", False)


def test_is_clip_needs_the_full_distribution_and_beta_reaches_the_kls():
    """loss.is_clip compares the sampler's log-probs with the trainer's: the nucleus of top_p < 1
    would renormalise only the sampler's, so it is refused, naming both keys. beta 0 and 1 are
    accepted (the KLs)."""
    with pytest.raises(ValueError, match=r"loss\.is_clip: needs rollout\.top_p=1"):
        load_config(overrides=["loss.is_clip=2", "rollout.top_p=0.9"])
    assert load_config(overrides=["loss.is_clip=2"]).loss.is_clip == 2.0
    for beta in (0, 1):
        assert load_config(overrides=["loss.divergence=jsd", f"loss.beta={beta}"]).loss.beta == beta


def test_clip_must_be_positive():
    with pytest.raises(ValueError, match=r"loss\.clip: must be > 0"):
        load_config(overrides=["loss.divergence=forward_kl", "loss.clip=-1"])


def test_format_grader_and_data_fields(tmp_path):
    cfg = load_config()
    assert (cfg.format, cfg.grader, cfg.data.fields.question, cfg.data.fields.answer,
            cfg.data.fields.reference_solution) == ("steps", "exact", "question", "answer", "reference_solution")
    f = tmp_path / "run.yaml"
    f.write_text("format: free\ngrader: math\ndata:\n  path: omr.parquet\n  fields:\n    question: problem\n"
                 "    answer: expected_answer\n    reference_solution: generated_solution\n")
    cfg = load_config(str(f))
    assert (cfg.format, cfg.grader, cfg.data.path) == ("free", "math", "omr.parquet")
    assert (cfg.data.fields.question, cfg.data.fields.answer, cfg.data.fields.reference_solution) == (
        "problem", "expected_answer", "generated_solution")
    saved = tmp_path / "saved.yaml"
    saved.write_text(to_yaml(cfg))
    assert load_config(str(saved)) == cfg
    for overrides, message in [
        (["format=tags"], "^format: expected one of"),
        (["grader=sympy"], "^grader: expected one of"),
        (["data.fields.question= "], "^data.fields.question: must name a column"),
        (["data.fields.answer=question"], "^data.fields.answer: the same column as data.fields.question"),
        (["condition=reference", "data.fields.reference_solution="], "^data.fields.reference_solution: condition=reference"),
        (["format=free", "rollout.stop_at_answer=true"], "^rollout.stop_at_answer: only with format=steps"),
        (["data.fields.problem=x"], "^data.fields.problem: unknown config key"),
    ]:
        with pytest.raises(ValueError, match=message):
            load_config(overrides=overrides)
    f.write_text("data:\n  fields:\n    answer: question\n")
    with pytest.raises(ValueError, match=r"run\.yaml:3: data\.fields\.answer"):
        load_config(str(f))


def test_misspelled_keys_get_a_suggestion():
    with pytest.raises(ValueError, match=r"stpes: unknown config key \(did you mean steps\?\)"):
        load_config(overrides=["stpes=3"])
    with pytest.raises(ValueError, match=r"optm: unknown config section \(did you mean optim\?\)"):
        load_config(overrides=["optm.lr=1"])
    with pytest.raises(ValueError, match=r"did you mean optim\.weight_decay"):
        load_config(overrides=["optim.wieght_decay=0.1"])



@pytest.mark.parametrize("override, guess", [
    ("critic.url=http://x/v1", "critic.base_url"),  # a part of the key's name
    ("critic.api_key=x", "critic.api_key_env"),
    ("critic.max_retries=3", "critic.retries"),  # holds the name
    ("lr=1e-4", "optim.lr"),  # the key of another section with that very name
    ("critic.lr=1e-4", "optim.lr"),
    ("temperature=1", "rollout.temperature or loss.temperature or eval.temperature"),
    ("model.dtyp=float32", "model.dtype"),
])
def test_unknown_keys_get_a_suggestion_from_the_whole_tree(override, guess):
    name = override.split("=")[0]
    with pytest.raises(ValueError, match=f"^{re.escape(name)}: unknown config key \\(did you mean {re.escape(guess)}\\?\\)$"):
        load_config(overrides=[override])
    with pytest.raises(ValueError, match=r"^foo: unknown config key$"):  # no guess rather than a wild one
        load_config(overrides=["foo=1"])


@pytest.mark.parametrize("override, message", [
    ("seed=99999999999999999999999", "seed: 99999999999999999999999 is out of range (at most a 64-bit integer)"),
    ("steps=99999999999999999999999", "steps: 99999999999999999999999 is out of range"),
    ("critic.concurrency=-99999999999999999999999", "critic.concurrency: -99999999999999999999999 is out of range"),
    ("seed=" + "9" * 5000, "seed: expected int, got '9999999999999999999... (5002 characters)"),
    ("seed=4294967296", "seed: must be in [0, 2**31), got 4294967296"),
    ("seed=-1", "seed: must be in [0, 2**31), got -1"),
    ("data.seed=2147483648", "data.seed: must be in [0, 2**31)"),
])
def test_integers_out_of_range_name_the_key(override, message):
    with pytest.raises(ValueError, match="^" + re.escape(message)):
        load_config(overrides=[override])
    assert load_config(overrides=["seed=2147483647", "data.seed=0"]).seed == 2**31 - 1


def test_an_integer_out_of_range_in_a_yaml_file_names_its_line(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("steps: 3\nseed: 99999999999999999999999\n")
    with pytest.raises(ValueError, match=r"run\.yaml:2: seed: 99999999999999999999999 is out of range"):
        load_config(str(f))
    f.write_text("steps: 3\nseed: " + "9" * 5000 + "\n")
    with pytest.raises(ValueError, match=r"^--config: .*run\.yaml: a value YAML cannot read \(Exceeds the limit"):
        load_config(str(f))


def test_errors_from_a_config_file_name_its_line(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("steps: 3\noptim:\n  wieght_decay: 0.1\n")
    with pytest.raises(ValueError, match=r"run\.yaml:3: optim\.wieght_decay: unknown config key"):
        load_config(str(f))
    f.write_text("steps: 3\nrollout:\n  temperature: -1\n")
    with pytest.raises(ValueError, match=r"run\.yaml:3: rollout\.temperature: must be > 0"):
        load_config(str(f))
    with pytest.raises(ValueError, match=r"^rollout\.temperature"):  # overridden: the file is not to blame
        load_config(str(f), ["rollout.temperature=-2"])
    f.write_text("steps: 3\nloss: sampled_token\nloss.divergence: forward_kl\nloss.clip: -1\n")
    with pytest.raises(ValueError, match=r"run\.yaml:4: loss\.clip: must be > 0"):
        load_config(str(f))
    f.write_text("steps: 3\nteacher: {ema_rate: 2}\n")  # a section mapping: the section's line
    with pytest.raises(ValueError, match=r"run\.yaml:2: teacher\.ema_rate"):
        load_config(str(f))
    f.write_text("condition: grpo\nrollout:\n  group_size: 4\n")
    with pytest.raises(ValueError, match=r"^rollout\.group_size"):  # the override is to blame
        load_config(str(f), ["rollout.group_size=1"])


def test_bad_yaml_file_names_the_flag(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("- a list\n")
    with pytest.raises(ValueError, match="--config"):
        load_config(str(f))
    with pytest.raises(ValueError, match="--config"):
        load_config(str(tmp_path / "missing.yaml"))


def test_every_field_has_a_docstring():
    """Each field is documented in the source (the attribute docstring right below it)."""
    import ast
    import inspect

    import fastsd.config.tree as mod

    tree = ast.parse(inspect.getsource(mod))
    for cls in [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name.endswith("Config")]:
        body = cls.body
        for i, node in enumerate(body):
            if isinstance(node, ast.AnnAssign) and not _is_classvar(node) and not _is_section(node):
                nxt = body[i + 1] if i + 1 < len(body) else None
                assert isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant), f"{cls.name}.{node.target.id}"


def _is_classvar(node):
    return "ClassVar" in ast_unparse(node.annotation)


def _is_section(node):
    return ast_unparse(node.annotation).endswith("Config")


def ast_unparse(node):
    import ast

    return ast.unparse(node)


def test_cli_dry_run_prints_resolved_config_and_errors_exit_2():
    run = lambda *a: subprocess.run([sys.executable, "-m", "fastsd.cli", *a], capture_output=True, text=True, timeout=120)
    ok = run("--dry-run", "condition=grpo", "optim.lr=1e-5")
    assert ok.returncode == 0, ok.stderr
    printed = yaml.safe_load(ok.stdout)
    assert printed["condition"] == "grpo" and printed["optim"]["lr"] == 1e-5
    bad = run("--dry-run", "optim.lr=oops")
    assert bad.returncode == 2 and "optim.lr" in bad.stderr
    assert TrainConfig().run_dir  # a default run directory exists


def test_a_key_set_twice_in_a_yaml_file_is_an_error_naming_both_lines(tmp_path):
    """YAML keeps the last of two equal keys without a word: optim: {lr: 1e-4, lr: 1} trained at 1."""
    f = tmp_path / "run.yaml"
    f.write_text("steps: 3\noptim:\n  lr: 1.0e-4\n  lr: 1\n")
    with pytest.raises(ValueError, match=rf"{f}:4: optim.lr: set twice \(first at line 3\)"):
        load_config(str(f))
    f.write_text("optim: {lr: 1.0e-4}\noptim: {lr: 1}\n")
    with pytest.raises(ValueError, match=rf"{f}:2: optim: set twice \(first at line 1\)"):
        load_config(str(f))


def test_quoted_overrides_are_unquoted_for_every_type():
    """templates.student="Q: {question}" kept its quotes while optim.lr="1e-4" was refused."""
    cfg = load_config(overrides=[r'templates.student="Q: {question}\n"', "optim.lr='1e-4'", 'run_dir="runs/a b"'])
    assert cfg.templates.student == "Q: {question}\n" and cfg.optim.lr == 1e-4 and cfg.run_dir == "runs/a b"
    assert load_config(overrides=['templates.student=Q: "{question}"']).templates.student == 'Q: "{question}"'


def test_dry_run_says_what_ignores_is_clip_and_clip():
    from fastsd.config.dry_run import ignored

    grpo = ignored(load_config(overrides=["condition=grpo", "rollout.group_size=2", "loss.is_clip=2"]))
    assert "grpo" in grpo["loss.is_clip"]
    ref = ignored(load_config(overrides=["condition=reference", "loss.is_clip=2", "loss.clip=0.05"]))
    assert "loss.is_clip" not in ref and "loss.clip" not in ref  # clip now applies to reverse_kl (auto) too
