"""The replay memory (mera/continual/replay.py): r% of a modality's training data, drawn once per
run seed and modality, shared by replay and realign, recorded in the run directory."""

import json
from types import SimpleNamespace

from mera.continual.replay import ReplayMemory
from mera.continual.strategies.realign import Realign, RealignParams
from mera.continual.strategies.replay import Replay, ReplayParams
from mera.data.pipeline import ModalitySets


def _sets(n=(40, 60)):
    def items(m, task, k):
        return [SimpleNamespace(modality=m, task=task, id=f"{m}-{task}-{i}") for i in range(k)]

    return {m: ModalitySets(items(m, "caption", n[0]), [], items(m, "qa", n[1]), [])
            for m in ("image", "video", "audio")}


def _ctx(memory, seen, seed):
    model = SimpleNamespace(connector_parameters=lambda m: [])
    return SimpleNamespace(replay=memory.samples, seen=seen, seed=seed, log={}, model=model)


def test_the_same_samples_at_every_stage_for_replay_and_realign(tmp_path):
    memory = ReplayMemory(_sets(), seed=0, record_dir=tmp_path)
    # stage 2 (seen image, video) and stage 3 (seen image, video, audio): other stage seeds
    step2 = SimpleNamespace(data=[], groups=[])
    Replay(ReplayParams(ratio=0.1)).prepare_instruct(_ctx(memory, ["image", "video"], seed=11), step2)
    step3 = SimpleNamespace(data=[], groups=[])
    Replay(ReplayParams(ratio=0.1)).prepare_instruct(_ctx(memory, ["image", "video", "audio"], seed=99), step3)
    image2 = [s.id for s in step2.data if s.modality == "image"]
    image3 = [s.id for s in step3.data if s.modality == "image"]
    assert image2 == image3 and len(image2) == 10  # 10% of 100, the same ids at stages 2 and 3
    # realign at stage 3 uses the very same memories, the current modality's included
    realign = Realign(RealignParams(ratio=0.1)).replay_set(_ctx(memory, ["image", "video", "audio"], seed=5))
    assert [s.id for s in realign if s.modality == "image"] == image2
    assert {s.modality for s in realign} == {"image", "video", "audio"} and len(realign) == 30
    assert {s.task for s in realign if s.modality == "image"} == {"caption", "qa"}  # mixed
    # a fresh memory of the same run seed draws the same; another run seed another one
    assert [s.id for s in ReplayMemory(_sets(), seed=0).samples("image", 0.1)] == image2
    assert [s.id for s in ReplayMemory(_sets(), seed=1).samples("image", 0.1)] != image2


def test_memories_of_different_ratios_are_nested_and_recorded(tmp_path):
    memory = ReplayMemory(_sets(), seed=3, record_dir=tmp_path)
    small = {s.id for s in memory.samples("video", 0.02)}
    big = {s.id for s in memory.samples("video", 0.1)}
    assert len(small) == 2 and len(big) == 10 and small < big
    assert len(memory.samples("audio", 0.001)) == 1  # at least one sample
    rec = json.loads((tmp_path / "video_r0.1.json").read_text())
    assert rec["size"] == 10 and rec["of"] == 100 and set(rec["ids"]) == big and rec["ratio"] == 0.1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["audio_r0.001.json", "video_r0.02.json", "video_r0.1.json"]
