"""The micro run shared by the end-to-end tests: a 2-modality config on tiny assets
(image with an MLP, point cloud with a Q-Former). The assets come from the session
fixture ``micro_assets`` in conftest.py."""

from pathlib import Path

import yaml


def build_micro_assets(root: Path) -> Path:
    """A tiny pre-trained Llama, the toy tokenizer and random toy encoders, saved the real way."""
    import torch

    from mera.data.toy_world import text_instructions, vocabulary
    from mera.model.encoders.toy import build_toy_encoder, save_toy_encoder
    from mera.zoo.lm import LMConfig, pretrain_lm
    from mera.zoo.tokenizer import build_tokenizer

    tok = build_tokenizer(vocabulary(), root / "tokenizer")
    # a quickly pre-trained tiny LM, so that the experts' scores are not all zero
    pretrain_lm(tok, text_instructions(1500, seed=0), root / "llm",
                LMConfig(hidden_size=64, num_layers=2, num_heads=4, steps=80, n_eval=20), progress=False)
    for m in ("image", "point"):
        torch.manual_seed(1)
        save_toy_encoder(build_toy_encoder(m), root / m)
    return root



def build_tiny_assets(root: Path) -> Path:
    """A tiny Llama (2 training steps), the toy tokenizer, random toy image / point encoders and a
    small toy world on disk (8 training and 4 test samples per set): the bad-input and full-disk
    tests, which need files of every kind and no meaningful scores."""
    import torch

    from mera.data.toy_world import ToyWorldConfig, text_instructions, vocabulary, write_world
    from mera.model.encoders.toy import build_toy_encoder, save_toy_encoder
    from mera.zoo.lm import LMConfig, pretrain_lm
    from mera.zoo.tokenizer import build_tokenizer

    tok = build_tokenizer(vocabulary(), root / "tokenizer")
    pretrain_lm(tok, text_instructions(50, seed=0), root / "llm",
                LMConfig(hidden_size=32, num_layers=1, num_heads=2, steps=2, batch_size=8, warmup_steps=1,
                         n_eval=4, eval_batch_size=4), progress=False)
    for m in ("image", "point"):
        torch.manual_seed(1)
        save_toy_encoder(build_toy_encoder(m), root / m)
    write_world(root / "world", ToyWorldConfig(n_train_caption=8, n_train_qa=8, n_test_caption=4, n_test_qa=4,
                                               n_points=64, image_size=16, video_frames=2, audio_seconds=0.5,
                                               audio_rate=4000))
    return root


def tiny_config(assets: Path, name: str, world: Path | None = None) -> dict:
    """A 2-stage Fine-Tuning config (image then point) on :func:`build_tiny_assets` (or on the toy
    world in ``world``), as a dict: the smallest run there is (1 epoch, batch 8, LoRA rank 2)."""
    world = world or assets / "world"
    sets = {m: {f"{t}_{s}": str(world / m / f"{t}_{s}.json") for t in ("caption", "qa") for s in ("train", "test")}
            for m in ("image", "point")}
    return {
        "name": name,
        "model": {"llm": str(assets / "llm"), "tokenizer": str(assets / "tokenizer"),
                  "branches": {m: {"encoder": {"family": f"toy_{m}", "path": str(assets / m)}} for m in ("image", "point")}},
        "data": {"sets": sets},
        "orders": {"seq": ["image", "point"]},
        "methods": [{"name": "FT", "strategies": ["finetune"]}],
        "train": {"align": {"epochs": 1, "batch_size": 8}, "instruct": {"epochs": 1, "batch_size": 8, "lr_lora": 1e-3},
                  "realign": {"epochs": 1, "batch_size": 8}, "lora": {"r": 2, "alpha": 4, "dropout": 0.0}},
        "eval": {"batch_size": 8, "max_new_tokens": 4},
    }

METHODS = [{"name": "Fine-Tuning", "strategies": ["finetune"]},
           {"name": "MERA (10%)", "strategies": ["merge", "realign"], "replay_ratio": 0.1},
           {"name": "Replay (10%)", "strategies": ["replay"], "replay_ratio": 0.1},
           {"name": "EWC", "strategies": ["ewc"], "fisher_ratio": 0.05},
           {"name": "PathWeave", "strategies": ["pathweave"], "pathweave_in_rank": 2}]


def micro_config(assets: Path, tmp_path: Path, methods: list[dict] | None = None, train: dict | None = None) -> Path:
    cfg = {
        "name": "micro",
        "model": {
            "llm": str(assets / "llm"),
            "tokenizer": str(assets / "tokenizer"),
            "branches": {
                "image": {"encoder": {"family": "toy_image", "path": str(assets / "image")}},
                "point": {"encoder": {"family": "toy_point", "path": str(assets / "point")},
                          "connector": {"type": "qformer", "num_queries": 4, "qformer_hidden": 32,
                                        "qformer_layers": 2, "qformer_heads": 4, "qformer_intermediate": 64}},
            },
        },
        "data": {"toy": {"n_train_caption": 32, "n_train_qa": 64, "n_test_caption": 8, "n_test_qa": 16}},
        "orders": {"sequential": ["image", "point"]},
        "methods": methods if methods is not None else METHODS,
        "train": {"align": {"epochs": 2, "batch_size": 8, "lr_connector": 1e-3},
                  "instruct": {"epochs": 3, "batch_size": 8, "micro_batch_size": 4, "lr_connector": 1e-3,
                               "lr_lora": 5e-3},
                  "realign": {"epochs": 1, "batch_size": 4, "lr_connector": 1e-3},
                  "lora": {"r": 4, "alpha": 8, "dropout": 0.0}, **(train or {})},
        "eval": {"batch_size": 8, "max_new_tokens": 12},
    }
    path = tmp_path / "micro.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path
