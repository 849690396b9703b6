"""The toy world: determinism, files on disk, the language, and media that match their labels."""

import hashlib
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from mera import MODALITIES, PLACEHOLDERS
from mera.data import toy_world as tw
from mera.data.format import load_dataset
from mera.data.media import AudioClip, read_media
from mera.errors import ConfigError

SMALL = dict(n_train_caption=12, n_train_qa=12, n_test_caption=6, n_test_qa=6, n_val_caption=5, n_val_qa=5)
SPLITS = ("train", "test", "val")


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _media_equal(a, b) -> bool:
    if isinstance(a, AudioClip):
        return a.sample_rate == b.sample_rate and np.array_equal(a.waveform, b.waveform)
    return a.dtype == b.dtype and np.array_equal(a, b)


@pytest.mark.parametrize("modality", MODALITIES)
def test_generate_is_deterministic_and_seed_dependent(modality):
    a = tw.generate(modality, "qa", "train", 5, seed=3)
    b = tw.generate(modality, "qa", "train", 5, seed=3)
    c = tw.generate(modality, "qa", "train", 5, seed=4)
    assert [s.prompt for s in a] == [s.prompt for s in b]
    assert all(_media_equal(x.media, y.media) for x, y in zip(a, b))
    assert not any(_media_equal(x.media, y.media) for x, y in zip(a, c))
    # prefix-stable: the first samples do not depend on how many are drawn
    longer = tw.generate(modality, "qa", "train", 8, seed=3)
    assert all(_media_equal(x.media, y.media) and x.answer == y.answer for x, y in zip(a, longer))
    # train, test and val streams differ
    t = tw.generate(modality, "qa", "test", 5, seed=3)
    v = tw.generate(modality, "qa", "val", 5, seed=3)
    assert not any(_media_equal(x.media, y.media) for x, y in zip(a, t))
    assert not any(_media_equal(x.media, y.media) for x, y in zip(a, v))
    assert not any(_media_equal(x.media, y.media) for x, y in zip(t, v))


def test_write_world_is_byte_identical_and_cached(tmp_path):
    cfg = tw.ToyWorldConfig(seed=1, **SMALL)
    p1 = tw.write_world(tmp_path / "a", cfg)
    tw.write_world(tmp_path / "b", cfg)
    fa, fb = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert fa == fb
    assert len([k for k in fa if k.endswith(".json")]) == 25  # 24 sets + manifest
    assert len(fa) == 25 + 46 * (1 + 4 + 1 + 1)  # 46 samples per modality; a video has 4 frame files
    for m in MODALITIES:
        for t in ("caption", "qa"):
            for s in SPLITS:
                assert p1[m][t][s] == str((tmp_path / "a" / m / f"{t}_{s}.json").absolute())
                assert os.path.isfile(p1[m][t][s])
    assert len([k for k in fa if k.startswith("video/media/caption_test/") and k.endswith(".png")]) == 6 * 4
    assert len([k for k in fa if k.startswith("video/media/qa_val/") and k.endswith(".png")]) == 5 * 4
    # a second call with the same config rewrites nothing
    stamp = {k: (tmp_path / "a" / k).stat().st_mtime_ns for k in fa}
    tw.write_world(tmp_path / "a", cfg)
    assert stamp == {k: (tmp_path / "a" / k).stat().st_mtime_ns for k in fa}
    # another seed: other data, written over the old world
    tw.write_world(tmp_path / "a", tw.ToyWorldConfig(seed=2, **SMALL))
    fc = _files(tmp_path / "a")
    assert fc["image/caption_train.json"] != fa["image/caption_train.json"] or \
        fc["image/media/caption_train/00000.png"] != fa["image/media/caption_train/00000.png"]
    assert fc["image/media/caption_train/00000.png"] != fa["image/media/caption_train/00000.png"]
    assert fc["manifest.json"] != fa["manifest.json"]


def test_files_round_trip_to_generated_values(tmp_path):
    cfg = tw.ToyWorldConfig(seed=5, **SMALL)
    paths = tw.write_world(tmp_path, cfg)
    for m in MODALITIES:
        for t in ("caption", "qa"):
            for s in SPLITS:
                loaded = load_dataset(paths[m][t][s])
                gen = tw.generate(m, t, s, getattr(cfg, f"n_{s}_{t}"), cfg.seed, cfg)
                assert len(loaded) == len(gen)
                for a, g in zip(loaded, gen):
                    assert (a.id, a.modality, a.task, a.prompt, a.answer, a.references) == \
                        (g.id, g.modality, g.task, g.prompt, g.answer, g.references)
                    assert _media_equal(read_media(m, a.media), g.media)


# What the train and test sets of SMALL at seed 1 were before the validation split existed (git
# 2f7641f): the set files' bytes and the generated media, hashed. Adding "val" must change nothing.
TRAIN_TEST_DIGEST = "c45aa0b476776aff41f71c817000f9dd79c2cebf4852dc159adeee856729fdf9"


def _media_bytes(media) -> bytes:
    a = media.waveform if isinstance(media, AudioClip) else media
    return np.ascontiguousarray(a).tobytes()


def test_train_and_test_sets_are_unchanged_by_the_validation_split(tmp_path):
    cfg = tw.ToyWorldConfig(seed=1, **SMALL)
    tw.write_world(tmp_path, cfg)
    h = hashlib.sha256()
    for m in MODALITIES:
        for t in ("caption", "qa"):
            for s in ("train", "test"):
                h.update((tmp_path / m / f"{t}_{s}.json").read_bytes())
                for x in tw.generate(m, t, s, getattr(cfg, f"n_{s}_{t}"), cfg.seed, cfg):
                    h.update(_media_bytes(x.media))
    assert h.hexdigest() == TRAIN_TEST_DIGEST
    # the size of the validation split does not touch the other splits
    other = tw.write_world(tmp_path / "b", tw.ToyWorldConfig(seed=1, **{**SMALL, "n_val_caption": 9, "n_val_qa": 1}))
    for m in MODALITIES:
        for t in ("caption", "qa"):
            for s in ("train", "test"):
                assert Path(other[m][t][s]).read_bytes() == (tmp_path / m / f"{t}_{s}.json").read_bytes()


def test_validation_split_is_disjoint_from_train_and_test(tmp_path):
    cfg = tw.ToyWorldConfig(seed=0)
    assert (cfg.n_val_caption, cfg.n_val_qa) == (cfg.n_test_caption, cfg.n_test_qa) == (60, 60)
    for m in MODALITIES:
        seen_ids, seen_media = set(), set()
        for t in ("caption", "qa"):
            for s, n in (("train", 200), ("test", 60)):
                for x in tw.generate(m, t, s, n, 0, cfg):
                    seen_ids.add(x.id)
                    seen_media.add(_media_bytes(x.media))
        for t in ("caption", "qa"):
            val = tw.generate(m, t, "val", 60, 0, cfg)
            assert all(x.id.startswith(f"{m}_{t}_val_") for x in val)
            assert not {x.id for x in val} & seen_ids
            assert not {_media_bytes(x.media) for x in val} & seen_media
    # on disk: own files, own media folders, no id or media file shared with train or test
    paths = tw.write_world(tmp_path, tw.ToyWorldConfig(seed=2, **SMALL))
    for m in MODALITIES:
        ids = {s: {x.id for t in ("caption", "qa") for x in load_dataset(paths[m][t][s])} for s in SPLITS}
        media = {s: {(tmp_path / m / "media" / f"{t}_{s}" / f.name).read_bytes()
                     for t in ("caption", "qa") for f in (tmp_path / m / "media" / f"{t}_{s}").iterdir()} for s in SPLITS}
        assert len(ids["val"]) == 10 and not ids["val"] & (ids["train"] | ids["test"])
        assert media["val"] and not media["val"] & (media["train"] | media["test"])
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["counts"]["image/caption_val"] == 5 and manifest["sets"]["audio"]["qa"]["val"] == "audio/qa_val.json"


@pytest.mark.parametrize("modality", MODALITIES)
def test_samples_are_well_formed(modality):
    heads = tw.attribute_heads(modality)
    for task in ("caption", "qa"):
        for split in SPLITS:
            for s in tw.generate(modality, task, split, 40, seed=0):
                assert set(s.attributes) == set(heads)
                for k, v in s.attributes.items():
                    assert -1 <= v < heads[k]
                assert s.prompt.count(PLACEHOLDERS[modality]) == 1
                assert s.answer in s.references
                if task == "caption":
                    assert s.prompt == tw.CAPTION_PROMPTS[modality]
                    if split in ("test", "val"):  # every template is a reference
                        assert s.references == tw.all_captions(modality, s.attributes)
                        assert len(set(s.references)) >= 3
                    else:
                        assert s.references == [s.answer]
                else:
                    assert s.references == [s.answer] and len(s.answer.split()) <= 2
    shapes = {"image": (32, 32, 3), "video": (4, 32, 32, 3), "point": (256, 6)}
    s = tw.generate(modality, "caption", "train", 1)[0]
    if modality == "audio":
        assert s.media.sample_rate == 8000 and s.media.waveform.shape == (8000,)
        assert np.abs(s.media.waveform).max() <= 1.0
    else:
        assert s.media.shape == shapes[modality]


def test_captions_and_answers_say_what_the_attributes_say():
    for s in tw.generate("video", "caption", "test", 30):
        a = s.attributes
        for r in s.references:
            assert tw.COLOURS[a["colour"]] in r.split() and tw.SHAPES_2D[a["shape"]] in r.split()
            assert tw.DIRECTIONS[a["direction"]] in r.split()
    for s in tw.generate("audio", "qa", "test", 60):
        a = s.attributes
        if "how many" in s.prompt:
            assert s.answer == tw.NUMBERS[a["count"]]
        elif "pitch" in s.prompt:
            assert s.answer == tw.PITCHES[a["pitch"]]
        else:
            assert s.answer == tw.TIMBRES[a["timbre"]]
    for s in tw.generate("image", "caption", "test", 30):
        n = s.attributes["count"] + 1
        assert s.references[3].startswith(f"{tw.NUMBERS[n - 1]} shape")
        assert sum(r.count(" and ") for r in s.references[:2]) == 2 * (n - 1)


# ---------------------------------------------------------------- the media match their labels

def test_image_shapes_sit_in_their_quadrants_with_their_colours():
    hits = 0
    samples = tw.generate("image", "caption", "train", 60, seed=2)
    for s in samples:
        img = s.media.astype(float) / 255
        a = s.attributes
        for k in (1, 2):
            if a[f"colour_{k}"] < 0:
                continue
            row, col = divmod(a[f"position_{k}"], 2)
            quad = img[row * 16:(row + 1) * 16, col * 16:(col + 1) * 16].reshape(-1, 3)
            target = tw._COLOUR_RGB[a[f"colour_{k}"]]
            dist = np.linalg.norm(quad - target, axis=1)
            # enough pixels of the labelled colour in the labelled quadrant (a small shape: >= 6)
            hits += int((dist < 0.25).sum() >= 6)
    total = sum(s.attributes["count"] + 1 for s in samples)
    assert hits >= 0.9 * total


def test_video_shape_moves_in_the_labelled_direction():
    ok = 0
    samples = tw.generate("video", "qa", "train", 40, seed=1)
    for s in samples:
        target = tw._COLOUR_RGB[s.attributes["colour"]]
        cents = []
        for fr in s.media.astype(float) / 255:
            mask = np.linalg.norm(fr - target, axis=2) < 0.25
            ys, xs = np.nonzero(mask)
            cents.append((xs.mean(), ys.mean()))
        dx, dy = np.subtract(cents[-1], cents[0])
        d = s.attributes["direction"]
        moved, across = {0: (-dx, dy), 1: (dx, dy), 2: (-dy, dx), 3: (dy, dx)}[d]
        ok += int(moved > 1.5 and abs(across) < moved)
    assert ok >= 0.9 * len(samples)


def test_audio_beeps_count_and_pitch():
    ok_count = ok_pitch = 0
    samples = tw.generate("audio", "caption", "train", 40, seed=3)
    for s in samples:
        w = s.media.waveform.astype(float)
        frame = 80  # 10 ms
        env = np.sqrt((w[: len(w) // frame * frame].reshape(-1, frame) ** 2).mean(1))
        loud = env > 0.12
        onsets = int(loud[0]) + int(np.sum(loud[1:] & ~loud[:-1]))
        ok_count += int(onsets == s.attributes["count"] + 1)
        spec = np.abs(np.fft.rfft(w))
        freqs = np.fft.rfftfreq(len(w), 1 / 8000)
        peak = freqs[np.argmax(spec[freqs > 100]) + np.sum(freqs <= 100)]
        lo, hi = tw._PITCH_HZ[s.attributes["pitch"]]
        # the strongest component is the fundamental, or a low harmonic of it
        ok_pitch += int(any(lo * 0.95 <= peak / h <= hi * 1.05 for h in (1, 2, 3)))
    assert ok_count >= 0.75 * len(samples)
    assert ok_pitch >= 0.9 * len(samples)


def test_point_proportions_and_colour():
    ratios = {0: [], 1: [], 2: []}
    for s in tw.generate("point", "caption", "train", 90, seed=4):
        p = s.media
        xyz = p[:, :3]
        lo, hi = np.percentile(xyz, [5, 95], axis=0)
        ext = hi - lo
        ratios[s.attributes["proportion"]].append(ext[2] / np.sqrt(ext[0] * ext[1]))
        colour = np.median(p[:, 3:], axis=0)
        assert np.argmin(np.linalg.norm(tw._COLOUR_RGB - colour, axis=1)) == s.attributes["colour"]
        assert np.linalg.norm(xyz, axis=1).max() < 1.2
    tall, regular, flat = (np.median(ratios[k]) for k in range(3))
    assert tall > regular > flat


# ---------------------------------------------------------------- the language

def _words(text: str) -> list[str]:
    for p in PLACEHOLDERS.values():
        text = text.replace(p, " ")
    return text.split()


def test_vocabulary_covers_all_text_and_nothing_unused():
    vocab = tw.vocabulary()
    assert vocab == sorted(set(vocab))
    assert not any(w.startswith("<") or w.startswith("{") or re.search(r"\s", w) for w in vocab)
    used = set()
    for m in MODALITIES:
        for t in ("caption", "qa"):
            for s in tw.generate(m, t, "test", 150, seed=0):
                for text in [s.prompt, s.answer, *s.references]:
                    used.update(_words(text))
    for prompt, answer in tw.text_instructions(1500, seed=0):
        used.update(_words(prompt) + _words(answer))
    assert used <= set(vocab), sorted(used - set(vocab))
    assert set(vocab) <= used, sorted(set(vocab) - used)  # no word that nothing uses
    # shared words carry the interference between modalities
    for w in ("red", "blue", "two", "what", "colour", "shape"):
        assert w in vocab


def test_text_instructions_teach_describe_and_colour_shape_only():
    pairs = tw.text_instructions(600, seed=1)
    assert pairs == tw.text_instructions(600, seed=1)
    assert pairs != tw.text_instructions(600, seed=2)
    describe = [p for p in pairs if p[0].startswith("describe the ")]
    questions = [p for p in pairs if not p[0].startswith("describe the ")]
    assert 200 < len(describe) < 400
    nouns = {p[0].split()[2] for p in describe}
    assert nouns == {"image", "video", "sound", "object"}
    for prompt, _answer in pairs:
        assert not any(ph in prompt for ph in PLACEHOLDERS.values())
    forbidden = {q.format(shape=sh, colour=c) for m in MODALITIES for qt, q in tw.QUESTIONS[m].items()
                 if qt not in tw.TEXT_QUESTION_TYPES for sh in tw.SHAPES_2D for c in tw.COLOURS}
    allowed = {q.format(shape=sh, colour=c) for m in MODALITIES for qt, q in tw.QUESTIONS[m].items()
               if qt in tw.TEXT_QUESTION_TYPES for sh in tw.SHAPES_2D for c in tw.COLOURS}
    assert "what colour is the circle ?" in allowed and len(allowed) == 4 + 6 + 2 + 2
    for prompt, answer in questions:
        assert prompt.endswith("?")
        assert not any(q in prompt for q in forbidden), prompt
        for w in ("where", "how", "which", "fast or slow", "big or small", "pitch of", "kind of", "proportions"):
            assert f" {w} " not in f" {prompt} ", (w, prompt)
        assert answer in tw.COLOURS + tw.SHAPES_2D + tw.SHAPES_3D
        assert prompt[prompt.rindex(" . ") + 3:] in allowed, prompt
    # the answer of a describe instruction is a caption of the described modality
    for prompt, answer in describe[:50]:
        noun = prompt.split()[2]
        m = {"image": "image", "video": "video", "sound": "audio", "object": "point"}[noun]
        assert answer.endswith(" .")
        assert any(w in answer.split() for w in _words(prompt.split(":", 1)[1]) if w not in (",", ";"))
        if m == "audio":
            assert any(t in answer for t in tw.TIMBRES)


def test_attribute_heads_and_config():
    assert tw.attribute_heads("audio") == {"count": 4, "pitch": 3, "timbre": 4}
    assert tw.attribute_heads("image")["x_1"] == 8
    with pytest.raises(ConfigError, match="smell"):
        tw.attribute_heads("smell")
    with pytest.raises(ValidationError, match="n_train_qa"):
        tw.ToyWorldConfig(n_train_qa=0)
    with pytest.raises(ValidationError, match="n_val_caption"):
        tw.ToyWorldConfig(n_val_caption=0)
    with pytest.raises(ConfigError, match="split"):
        tw.generate("image", "qa", "dev", 1)
    with pytest.raises(ValidationError, match="unknown"):
        tw.ToyWorldConfig(unknown=1)
    assert tw.config_hash(tw.ToyWorldConfig()) == tw.config_hash(tw.ToyWorldConfig())
    assert tw.config_hash(tw.ToyWorldConfig()) != tw.config_hash(tw.ToyWorldConfig(image_noise=0.1))
    assert tw.config_hash(tw.ToyWorldConfig()) != tw.config_hash(tw.ToyWorldConfig(n_val_qa=61))


def test_show_writes_a_sheet(tmp_path):
    from mera.data.show import show

    text, png = show(tmp_path, tw.ToyWorldConfig(), n_per_modality=2)
    assert Path(png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "== point ==" in text and text.count("ref:") == 4 * 2 * len(tw.IMAGE_TEMPLATES)
    first = tw.generate("audio", "caption", "test", 1)[0]
    assert first.answer in text


def test_write_world_refuses_a_foreign_manifest(tmp_path):
    from mera.errors import DataError

    (tmp_path / "manifest.json").write_text('{"something": "else"}')
    with pytest.raises(DataError, match=r"manifest\.json: exists but is not a toy world's manifest"):
        tw.write_world(tmp_path, tw.ToyWorldConfig(**SMALL))
    assert (tmp_path / "manifest.json").read_text() == '{"something": "else"}'


# ------------------------------------------------------------------------------ toy-world-2

# What toy-world-1 was before the version field existed (git 977391b): the hashes of the default
# config (the world's, the zoo's, the data folder's name) and one sample, which must not move.
V1_CONFIG_HASH = "41a005b6d308a38a"
V1_ZOO_CONFIG_HASH = "c90f47a9cb6edeb269ed9dd19c1ac4747559e7e29f244722b28065547fe8f73d"
V1_DATA_FOLDER = "4211c1c883f4"


def test_v1_is_unchanged_by_the_version_field():
    from mera.zoo.build import ZooConfig, config_hash, run_zoo_config, zoo_name

    cfg = tw.ToyWorldConfig()
    assert cfg.version == 1 and tw.ToyWorldConfig(version=1) == cfg
    assert "version" not in cfg.model_dump() and "version" not in cfg.model_dump_json()
    assert tw.config_hash(cfg) == V1_CONFIG_HASH
    assert hashlib.sha256(cfg.model_dump_json().encode()).hexdigest()[:12] == V1_DATA_FOLDER
    assert config_hash(ZooConfig()) == V1_ZOO_CONFIG_HASH
    assert config_hash(run_zoo_config(None, {})) == V1_ZOO_CONFIG_HASH and zoo_name(ZooConfig()) == "toy-zoo-v1"
    s = tw.generate("image", "qa", "val", 3)[2]
    assert (s.prompt, s.answer) == ("<image>\nis the green square big or small ?", "small")
    assert hashlib.sha256(s.media.tobytes()).hexdigest()[:16] == "e0dd65a3557e4fa6"
    c = tw.generate("audio", "caption", "test", 2)[1]
    assert (c.prompt, c.answer) == ("<audio>\ndescribe the sound .", "a low bell sounds once .")
    assert tw.vocabulary(2) == tw.vocabulary(1) and len(tw.vocabulary()) == 89


def test_v2_sizes_and_determinism(tmp_path):
    cfg = tw.ToyWorldConfig(version=2)
    for s in ("test", "val"):
        assert getattr(cfg, f"n_{s}_caption") >= 300 and getattr(cfg, f"n_{s}_qa") >= 300
    assert tw.ToyWorldConfig(version=2, n_val_qa=7).n_val_qa == 7  # still a config field
    assert cfg.model_dump()["version"] == 2 and tw.config_hash(cfg) != V1_CONFIG_HASH
    small = tw.ToyWorldConfig(version=2, seed=3, **SMALL)
    a, b = tw.write_world(tmp_path / "a", small), tw.write_world(tmp_path / "b", small)
    fa, fb = _files(tmp_path / "a"), _files(tmp_path / "b")  # same seed, same bytes (but the folder's name)
    assert fa.keys() == fb.keys()
    for k in fa:
        assert fa[k].replace(str(tmp_path / "a").encode(), b"@") == fb[k].replace(str(tmp_path / "b").encode(), b"@"), k
    assert json.loads((tmp_path / "a" / "manifest.json").read_text())["world_version"] == "toy-world-2"
    for m in MODALITIES:
        one = tw.generate(m, "qa", "val", 20, 3, small)
        assert [(x.prompt, x.answer) for x in one] == [(x.prompt, x.answer) for x in tw.generate(m, "qa", "val", 20, 3, small)]
        assert [(x.prompt, x.answer) for x in one] != [(x.prompt, x.answer) for x in tw.generate(m, "qa", "val", 20, 4, small)]
        # same scenes as toy-world-1 (media and attributes); only the language differs
        v1 = tw.generate(m, "caption", "val", 5, 3, tw.ToyWorldConfig(seed=3, **SMALL))
        v2 = tw.generate(m, "caption", "val", 5, 3, small)
        assert [x.attributes for x in v1] == [x.attributes for x in v2]
        assert [x.references for x in v1] == [x.references for x in v2]
        assert {x.prompt for x in v2} == {f"{PLACEHOLDERS[m]}\ndescribe it ."}
    assert len(a) == len(b) == 4


def test_v2_formats_are_shared_and_absent_from_the_text_pretraining():
    q2 = tw.questions(2)
    assert q2["image"]["count"] == q2["audio"]["count"] == "how many are there ?"
    assert q2["video"]["colour"] == q2["point"]["colour"] and q2["video"]["shape"] == q2["point"]["shape"]
    graded = [q2["image"]["size"], q2["video"]["speed"], q2["audio"]["pitch"], q2["point"]["proportion"]]
    assert all(q.startswith("how ") and q.endswith(" is it ?") or "how big is the" in q for q in graded)
    assert len(set(tw.caption_prompts(2).values())) == 4  # the placeholder alone differs
    assert len({p.split("\n", 1)[1] for p in tw.caption_prompts(2).values()}) == 1
    prompts = [p for p, _ in tw.text_instructions(2000, seed=0, version=2)]
    assert tw.text_instructions(300, seed=0, version=2) == tw.text_instructions(300, seed=0)
    new = {q.split("{")[0] for qs in q2.values() for q in qs.values()} - \
        {q.split("{")[0] for qs in tw.QUESTIONS.values() for q in qs.values()}
    assert "how many are there ?" in new and "describe it ." not in " ".join(prompts)
    for p in prompts:
        assert not any(p.endswith(n.strip()) for n in new if n.strip().endswith("?")), p


def test_run_zoo_config_follows_the_world_version():
    from mera.zoo.build import run_zoo_config, zoo_dir, zoo_name

    z = run_zoo_config({"home": "/x"}, {"version": 2})
    assert z.world.version == 2 and zoo_name(z) == "toy-zoo-v2" and zoo_dir(z) == Path("/x/toy-zoo-v2")
    assert run_zoo_config({"world": {"version": 1}}, {"version": 2}).world.version == 1  # said explicitly


def test_calibration_config_is_validation_only_with_the_realign_rule():
    from mera.config.loading import load_config
    from mera.runner.run_config import RunConfig

    cfg = load_config(Path(__file__).parents[1] / "configs" / "toy" / "calibration.yaml", [], RunConfig)
    assert cfg.eval.split == "val" and cfg.run_seeds == [100, 101, 102]
    assert cfg.data.toy == {"version": 2} and set(cfg.orders) == {"sequential", "reverse"}
    assert cfg.train.realign.lr_connector == cfg.train.instruct.lr_connector  # the rule, fixed before any run
    assert [m.name for m in cfg.methods] == ["Fine-Tuning", "MERA (10%)"]
