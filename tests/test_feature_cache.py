"""The disk feature cache: the same features as the in-memory cache, written once and read back
without running the encoder, in the chosen dtype; a damaged file is a clear error."""

import pytest
import torch

from mera.data.pipeline import FeatureProvider, load_sets
from mera.data.toy_world import ToyWorldConfig, write_world
from mera.errors import DataError
from mera.model.encoders.base import load_encoder


@pytest.fixture(scope="module")
def world(tmp_path_factory, micro_assets):
    root = tmp_path_factory.mktemp("world")
    paths = write_world(root, ToyWorldConfig(n_train_caption=6, n_train_qa=6, n_test_caption=2, n_test_qa=2))
    p = paths["image"]
    sets = load_sets({"image": {"caption_train": p["caption"]["train"], "caption_test": p["caption"]["test"],
                                "qa_train": p["qa"]["train"], "qa_test": p["qa"]["test"]}})
    return sets["image"].train, load_encoder("toy_image", str(micro_assets / "image"))


class Counting(torch.nn.Module):
    """The encoder, counting how many samples it encodes."""

    def __init__(self, enc):
        super().__init__()
        self.enc, self.seen = enc, 0
        self.num_tokens, self.output_dim, self.preprocess = enc.num_tokens, enc.output_dim, enc.preprocess

    def forward(self, x):
        self.seen += x.shape[0]
        return self.enc(x)


def test_disk_cache_matches_memory_and_is_computed_once(world, tmp_path):
    samples, enc = world
    mem = FeatureProvider({"image": enc}, cache=True, progress=False)
    mem.warm(samples)  # the same batches as the disk cache's (batching changes the last float bits)
    counting = Counting(enc)
    disk = FeatureProvider({"image": counting}, cache="disk", cache_dir=tmp_path / "f", progress=False)
    disk.warm(samples)
    assert counting.seen == len(samples) == 12
    assert len(list((tmp_path / "f" / "image").glob("*.safetensors"))) == 12
    for s in samples:
        assert torch.equal(disk.item(s)["features"], mem.item(s)["features"])
    again = FeatureProvider({"image": counting}, cache="disk", cache_dir=tmp_path / "f", progress=False)
    again.warm(samples)
    assert [again.item(s)["features"].shape for s in samples[:1]] == [(enc.num_tokens, enc.output_dim)]
    assert counting.seen == 12  # read back from disk: the encoder did not run again


def test_half_precision_disk_cache_and_damaged_file(world, tmp_path):
    samples, enc = world
    half = FeatureProvider({"image": enc}, cache="disk", cache_dir=tmp_path / "h", cache_dtype="float16",
                           progress=False)
    mem = FeatureProvider({"image": enc}, cache=True, progress=False)
    f = half.item(samples[0])["features"]  # both computed alone (a batch of one)
    assert f.dtype == torch.float32  # stored in float16, handed out as float32
    assert torch.equal(f, mem.item(samples[0])["features"].half().float())
    path = next((tmp_path / "h" / "image").glob("*.safetensors"))
    path.write_bytes(b"not safetensors")
    with pytest.raises(DataError, match="unreadable cached features"):
        half.item(samples[0])
