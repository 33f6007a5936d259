"""Response positions line up between student and teacher sequences."""


from fastsd.model.batch import build_batch


def test_positions_predict_the_response_tokens():
    s_prompts = [[5, 6, 7], [8]]
    t_prompts = [[9, 9, 9, 9, 9], [4, 4]]
    responses = [[20, 21], [30, 31, 32]]
    b = build_batch(s_prompts, responses, pad_id=0, teacher_prompts=t_prompts)
    assert b.targets.tolist() == [20, 21, 30, 31, 32]
    assert b.row.tolist() == [0, 0, 1, 1, 1]
    flat_s, flat_t = b.s_ids.reshape(-1), b.t_ids.reshape(-1)
    # the token right after each indexed position is the target it predicts
    assert flat_s[b.s_index + 1].tolist() == b.targets.tolist()
    assert flat_t[b.t_index + 1].tolist() == b.targets.tolist()
    assert b.s_attn.sum().item() == 3 + 2 + 1 + 3 and b.t_attn.sum().item() == 5 + 2 + 2 + 3


def test_empty_response_contributes_no_positions():
    b = build_batch([[1, 2], [3]], [[], [7]], pad_id=0)
    assert b.targets.tolist() == [7] and b.t_ids is None
    assert b.s_ids.reshape(-1)[b.s_index + 1].tolist() == [7]


def test_empty_prompt_is_an_error():
    import pytest

    with pytest.raises(ValueError, match="prompts"):
        build_batch([[]], [[1]], pad_id=0)
