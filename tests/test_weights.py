"""DiT weights from our Lightning checkpoints and released directories (init_from, DMD-2 roles, generate)."""

import pytest
import torch

from magi_train.models.checkpoint import export_released
from magi_train.models.dit import MODEL_CONFIGS, DiT
from magi_train.models.weights import load_dit_weights, read_dit_state


def _tiny(seed: int) -> DiT:
    torch.manual_seed(seed)
    return DiT(MODEL_CONFIGS["tiny"])


def _save(path, prefix, ema, raw=None, wrapper=""):
    ckpt = {"state_dict": {f"{prefix}{wrapper}{k}": v for k, v in ema.state_dict().items()},
            "magi_config": {"model": {"hidden_size": 128}}}
    if raw is not None:  # Lightning's EMA layout: state_dict = average, current_model_state = trained
        ckpt["current_model_state"] = {f"{prefix}{k}": v for k, v in raw.state_dict().items()}
    torch.save(ckpt, path)
    return path


def _same(a: DiT, b: DiT) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def test_ema_and_raw_weights_are_told_apart(tmp_path):
    ema, raw = _tiny(0), _tiny(1)
    path = _save(tmp_path / "a.ckpt", "model.", ema, raw)
    state, config, which = read_dit_state(path)
    assert which == "ema" and config["model"]["hidden_size"] == 128
    model = _tiny(2)
    assert load_dit_weights(model, path, "init_from") == "ema" and _same(model, ema)
    assert load_dit_weights(model, path, "init_from", weights="raw") == "raw" and _same(model, raw)


def test_student_prefix_and_wrapper_parts(tmp_path):
    student = _tiny(3)
    path = _save(tmp_path / "d.ckpt", "student.", student, wrapper="_checkpoint_wrapped_module.")
    model = _tiny(4)
    assert load_dit_weights(model, path, "distill.student.checkpoint") == "raw" and _same(model, student)
    with pytest.raises(ValueError, match="holds no EMA"):
        read_dit_state(path, "ema")


def test_wrong_model_or_file_is_a_clear_error(tmp_path):
    path = _save(tmp_path / "a.ckpt", "model.", _tiny(0))
    small = DiT(MODEL_CONFIGS["tiny"].__class__(**{**MODEL_CONFIGS["tiny"].__dict__, "num_layers": 2,
                                                    "mm_layers": [0, 1], "gelu7_layers": [0]}))
    with pytest.raises(ValueError, match="init_from=.*do not fit the model config"):
        load_dit_weights(small, path, "init_from")
    with pytest.raises(ValueError, match="no such released-format directory or checkpoint"):
        load_dit_weights(small, tmp_path / "missing.ckpt", "init_from")
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="could not read"):
        read_dit_state(tmp_path / "junk.ckpt")


def test_released_directory(tmp_path):
    source = _tiny(5)
    out = export_released(source, tmp_path / "released", dtype_policy="fp32")
    model = _tiny(6)
    assert load_dit_weights(model, out, "init_from") == "released" and _same(model, source)
