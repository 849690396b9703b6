"""Converters of the real data sets' official files (mera.data.convert), on tiny hand-made files."""

import argparse
import csv
import json
import os
from pathlib import Path

import pytest

from mera.cli import data as data_cli
from mera.data.convert import KNOWN_SETS, convert
from mera.data.format import load_dataset
from mera.errors import ConfigError, DataError, MeraError


def touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    return path


def write_csv(path: Path, rows, header=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        if header:
            w.writerow(header)
        w.writerows(rows)
    return path


def write_json(path: Path, obj) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj), encoding="utf-8")
    return path


def by_id(path):
    return {s.id: s for s in load_dataset(path)}


def record(out, stem):
    return json.loads((out / f"{stem}.convert.json").read_text())


# ------------------------------------------------------------------------------- MSCOCO


def coco_src(tmp_path, n_val=3, missing_val=None):
    src = tmp_path / "coco"
    train = {"images": [{"id": 1, "file_name": "COCO_train2014_000000000001.jpg"},
                        {"id": 2, "file_name": "COCO_train2014_000000000002.jpg"}],
             # image 1: the lowest annotation id (5) comes second in the file
             "annotations": [{"id": 9, "image_id": 1, "caption": "a later caption"},
                             {"id": 5, "image_id": 1, "caption": " A dog  on a mat.\n"},
                             {"id": 7, "image_id": 2, "caption": "two cats"}]}
    val = {"images": [{"id": 100 + k, "file_name": f"COCO_val2014_{100 + k:012d}.jpg"} for k in range(n_val)],
           "annotations": [{"id": 1000 + 2 * k + j, "image_id": 100 + k, "caption": f"val caption {k} {j}"}
                           for k in range(n_val) for j in (1, 0)]}
    write_json(src / "annotations" / "captions_train2014.json", train)
    write_json(src / "annotations" / "captions_val2014.json", val)
    for im in train["images"]:
        touch(src / "train2014" / im["file_name"])
    for im in val["images"]:
        if im["id"] != missing_val:
            touch(src / "val2014" / im["file_name"])
    return src


def test_mscoco_first_caption_references_and_user_paths(tmp_path):
    src, out = coco_src(tmp_path), tmp_path / "out"
    res = convert("mscoco", src, out)
    assert set(res) == {"train", "test"}
    train = by_id(out / "mscoco_train.json")
    s = train["mscoco_train_1"]
    assert s.answer == "A dog on a mat." and s.references == ["A dog on a mat."]  # lowest annotation id, cleaned
    assert s.prompt == "<image>\nDescribe the image briefly." and s.modality == "image" and s.task == "caption"
    # the media is the user's own file, by absolute path: nothing copied into out
    assert s.media == str(src / "train2014" / "COCO_train2014_000000000001.jpg")
    raw = json.loads((out / "mscoco_train.json").read_text())
    assert os.path.isabs(raw[0]["media"])
    assert not [p for p in out.rglob("*.jpg")]
    test = by_id(out / "mscoco_test.json")
    t = test["mscoco_test_101"]
    assert t.answer == "val caption 1 0" and t.references == ["val caption 1 0", "val caption 1 1"]
    rec = record(out, "mscoco_test")
    assert rec["seed"] == 0 and rec["missing_media"] == 0 and rec["samples"] == 3
    assert rec["subset"]["size"] == 1000 and rec["subset"]["taken"] == 3
    assert any(str(src / "annotations" / "captions_val2014.json") == f for f in rec["source_files"])
    assert [c["count"] for c in rec["counts"]][-1] == 3
    assert (out / "mscoco_test.missing.txt").read_text() == ""


def test_mscoco_missing_media_stops_or_is_skipped_and_reported(tmp_path):
    src, out = coco_src(tmp_path, missing_val=101), tmp_path / "out"
    gone = str(src / "val2014" / "COCO_val2014_000000000101.jpg")
    with pytest.raises(DataError) as e:
        convert("mscoco", src, out, split="all")
    assert gone in str(e.value) and "1 media file(s) not found" in str(e.value)
    assert not out.exists() or not list(out.iterdir())  # nothing written, not even the train split
    res = convert("mscoco", src, out, split="test", skip_missing=True)
    assert res["test"]["missing"] == 1 and res["test"]["samples"] == 2
    assert (out / "mscoco_test.missing.txt").read_text().splitlines() == [gone]
    assert "mscoco_test_101" not in by_id(out / "mscoco_test.json")
    assert record(out, "mscoco_test")["missing_media"] == 1
    assert not (out / "mscoco_train.json").exists()


def test_failed_run_never_clobbers_an_existing_output(tmp_path):
    src, out = coco_src(tmp_path), tmp_path / "out"
    convert("mscoco", src, out, split="test")
    before = (out / "mscoco_test.json").read_bytes()
    os.remove(src / "val2014" / "COCO_val2014_000000000100.jpg")
    with pytest.raises(DataError):
        convert("mscoco", src, out, split="test", limit=2, seed=3)
    assert (out / "mscoco_test.json").read_bytes() == before
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_seeded_subsets_are_reproducible_and_limited(tmp_path):
    src = coco_src(tmp_path, n_val=8)
    picks = []
    for k, seed in enumerate([0, 0, 1, 2, 3, 4]):
        out = tmp_path / f"o{k}"
        convert("mscoco", src, out, split="test", seed=seed, limit=3)
        ids = [s.id for s in load_dataset(out / "mscoco_test.json")]
        assert len(ids) == 3
        picks.append(ids)
        rec = record(out, "mscoco_test")
        assert rec["limit"] == 3 and rec["seed"] == seed and rec["subset"]["random"]
    assert picks[0] == picks[1]  # same seed, same subset
    assert len({tuple(p) for p in picks[1:]}) > 1  # the seed matters


def test_mscoco_malformed_annotation_names_file_and_row(tmp_path):
    src = coco_src(tmp_path)
    path = src / "annotations" / "captions_val2014.json"
    data = json.loads(path.read_text())
    del data["annotations"][3]["caption"]
    write_json(path, data)
    with pytest.raises(DataError) as e:
        convert("mscoco", src, tmp_path / "out", split="test")
    assert "captions_val2014.json" in str(e.value) and "annotations[3]" in str(e.value) and "caption" in str(e.value)
    data["annotations"][3]["caption"] = 17
    write_json(path, data)
    with pytest.raises(DataError, match=r"annotations\[3\].*must be a string"):
        convert("mscoco", src, tmp_path / "out", split="test")


# ------------------------------------------------------------------------------- OK-VQA


def okvqa_src(tmp_path):
    src = tmp_path / "okvqa"
    for sp, base in (("train", 10), ("val", 20)):
        qs = [{"image_id": base + k, "question": f"what is thing {k}?", "question_id": base * 100 + k}
              for k in range(3)]
        ans = [{"question_id": base * 100 + k, "image_id": base + k,
                "answers": [{"answer": a} for a in (["cat", "dog", "dog", "bird", "cat", "dog"] if k == 0 else ["x"])]}
               for k in range(3)]
        write_json(src / f"OpenEnded_mscoco_{sp}2014_questions.json", {"questions": qs})
        write_json(src / f"mscoco_{sp}2014_annotations.json", {"annotations": ans})
        for k in range(3):
            if (sp, k) != ("val", 2):
                touch(src / "images" / f"{sp}2014" / f"COCO_{sp}2014_{base + k:012d}.jpg")
    return src


def test_okvqa_most_frequent_answer_and_coco_file_names(tmp_path):
    src, out = okvqa_src(tmp_path), tmp_path / "out"
    with pytest.raises(DataError, match="COCO_val2014_000000000022.jpg"):
        convert("okvqa", src, out, media_dir=src / "images")
    convert("okvqa", src, out, media_dir=src / "images", skip_missing=True)
    tr = by_id(out / "okvqa_train.json")["okvqa_train_1000"]
    assert tr.answer == "dog" and tr.references == ["dog", "cat", "bird"]
    assert tr.prompt == "<image>\nwhat is thing 0?" and tr.task == "qa"
    assert tr.media == str(src / "images" / "train2014" / "COCO_train2014_000000000010.jpg")
    test = by_id(out / "okvqa_test.json")
    assert set(test) == {"okvqa_test_2000", "okvqa_test_2001"}
    assert "COCO_val2014_000000000022.jpg" in (out / "okvqa_test.missing.txt").read_text()


def test_okvqa_bad_json_names_file_and_line(tmp_path):
    src = okvqa_src(tmp_path)
    (src / "mscoco_val2014_annotations.json").write_text('{"annotations": [\n{"question_id": 1,,}]}')
    with pytest.raises(DataError, match=r"mscoco_val2014_annotations.json: not valid JSON .*line 2"):
        convert("okvqa", src, tmp_path / "out", split="test", media_dir=src / "images")


# ------------------------------------------------------------------------------- MSVD

MSVD_HEADER = ["VideoID", "Start", "End", "WorkerID", "Source", "AnnotationTime", "Language", "Description"]


def msvd_src(tmp_path):
    src = tmp_path / "msvd"
    clips = {"aaa_1_5": 1, "bbb_2_9": 2, "ccc_0_4": 1250, "ddd_3_8": 1301, "eee_4_6": 1302, "fff_1_2": 1971}
    (src).mkdir(parents=True)
    (src / "youtube_mapping.txt").write_text("".join(f"{c} vid{n}\n" for c, n in clips.items()))
    rows = []
    for c in clips:
        y, s, e = c.rsplit("_", 2)
        rows.append([y, s, e, "w1", "clean", "10", "German", f"ein video {c}"])
        rows.append([y, s, e, "w2", "clean", "11", "English", f"first {c}"])
        rows.append([y, s, e, "w3", "clean", "12", "English", f"second, {c}"])
    rows.append(["zzz", "0", "1", "w4", "clean", "9", "English", "a clip not in the mapping"])
    write_csv(src / "MSR Video Description Corpus.csv", rows, MSVD_HEADER)
    for c in clips:
        if c != "eee_4_6":
            touch(src / "YouTubeClips" / f"{c}.avi")
    return src


def test_msvd_english_first_caption_vid_ranges_and_missing(tmp_path):
    src, out = msvd_src(tmp_path), tmp_path / "out"
    with pytest.raises(DataError, match="eee_4_6.avi"):
        convert("msvd", src, out)
    convert("msvd", src, out, skip_missing=True)
    train = by_id(out / "msvd_train.json")
    assert set(train) == {"msvd_train_vid1", "msvd_train_vid2"}  # vid1250 (validation) and vid1971 excluded
    s = train["msvd_train_vid1"]
    assert s.answer == "first aaa_1_5" and s.references == ["first aaa_1_5"]  # English only, first in CSV order
    assert s.media == str(src / "YouTubeClips" / "aaa_1_5.avi") and s.prompt.startswith("<video>\n")
    test = by_id(out / "msvd_test.json")
    assert set(test) == {"msvd_test_vid1301"}
    assert test["msvd_test_vid1301"].references == ["first ddd_3_8", "second, ddd_3_8"]
    assert (out / "msvd_test.missing.txt").read_text().strip() == str(src / "YouTubeClips" / "eee_4_6.avi")
    counts = {c["step"]: c["count"] for c in record(out, "msvd_train")["counts"]}
    assert counts["rows with Language == English"] == 13 and counts["clips in youtube_mapping.txt"] == 6


def test_msvd_short_csv_row_names_line(tmp_path):
    src = msvd_src(tmp_path)
    path = src / "MSR Video Description Corpus.csv"
    path.write_text(path.read_text() + "yyy,1,2,w9,clean\n")
    with pytest.raises(DataError, match=r"MSR Video Description Corpus.csv: line 21: expected 8 columns"):
        convert("msvd", src, tmp_path / "out")


# ------------------------------------------------------------------------------- MSVD-QA


def msvdqa_src(tmp_path, n_test=5):
    src = tmp_path / "msvdqa"
    src.mkdir()
    (src / "youtube_mapping.txt").write_text("aaa_1_5 vid1\nbbb_2_9 vid2\nddd_3_8 vid1301\n")
    write_json(src / "train_qa.json", [{"id": 0, "video_id": 1, "question": "what is a man doing?", "answer": "run"},
                                       {"id": 1, "video_id": 2, "question": "who is cooking?", "answer": "woman"}])
    write_json(src / "test_qa.json", [{"id": 10 + k, "video_id": 1301, "question": f"what is {k}?",
                                       "answer": "cat"} for k in range(n_test)])
    for c in ("aaa_1_5", "ddd_3_8"):
        touch(src / "YouTubeClips" / f"{c}.avi")
    return src


def test_msvd_qa_video_mapping_subset_and_missing(tmp_path):
    src, out = msvdqa_src(tmp_path), tmp_path / "out"
    with pytest.raises(DataError, match="bbb_2_9.avi"):
        convert("msvd-qa", src, out, split="train")
    convert("msvd-qa", src, out, skip_missing=True, limit=3, seed=5)
    train = by_id(out / "msvd_qa_train.json")
    assert list(train) == ["msvd_qa_train_0"] and train["msvd_qa_train_0"].answer == "run"
    assert train["msvd_qa_train_0"].prompt == "<video>\nwhat is a man doing?"
    assert "bbb_2_9.avi" in (out / "msvd_qa_train.missing.txt").read_text()
    test = load_dataset(out / "msvd_qa_test.json")
    assert len(test) == 3 and all(s.media == str(src / "YouTubeClips" / "ddd_3_8.avi") for s in test)
    out2 = tmp_path / "out2"
    convert("msvd_qa", src, out2, split="test", limit=3, seed=5)
    assert [s.id for s in load_dataset(out2 / "msvd_qa_test.json")] == [s.id for s in test]


def test_msvd_qa_wrong_type_names_file_and_row(tmp_path):
    src = msvdqa_src(tmp_path)
    rows = json.loads((src / "test_qa.json").read_text())
    rows[2]["video_id"] = "1301"
    write_json(src / "test_qa.json", rows)
    with pytest.raises(DataError, match=r"test_qa.json: \[2\]: field 'video_id' must be an integer"):
        convert("msvd_qa", src, tmp_path / "out", split="test")


# ------------------------------------------------------------------------------- AudioCaps

AC_HEADER = ["audiocap_id", "youtube_id", "start_time", "caption"]


def audiocaps_src(tmp_path):
    src = tmp_path / "audiocaps"
    write_csv(src / "train.csv", [[1, "yt1", 30, "a dog barks"], [2, "yt2", 0, "rain falls"],
                                  [3, "yt3", 10, "a car passes"]], AC_HEADER)
    write_csv(src / "test.csv", [[12, "yt9", 20, "later caption"], [11, "yt9", 20, "first caption"],
                                 [13, "yt8", 0, "birds sing"]], AC_HEADER)
    for name in ("yt1_30.wav", "yt3_10.wav", "yt9_20.wav", "yt8_0.wav"):
        touch(src / "wav" / name)
    return src


def test_audiocaps_missing_clips_need_skip_missing(tmp_path):
    src, out = audiocaps_src(tmp_path), tmp_path / "out"
    with pytest.raises(DataError) as e:
        convert("audiocaps", src, out, media_dir=src / "wav")
    assert str(src / "wav" / "yt2_0.wav") in str(e.value)
    convert("audiocaps", src, out, media_dir=src / "wav", skip_missing=True)
    train = by_id(out / "audiocaps_train.json")
    assert set(train) == {"audiocaps_train_1", "audiocaps_train_3"}
    assert train["audiocaps_train_1"].media == str(src / "wav" / "yt1_30.wav")
    assert train["audiocaps_train_1"].prompt == "<audio>\nDescribe the audio briefly."
    assert (out / "audiocaps_train.missing.txt").read_text().splitlines() == [str(src / "wav" / "yt2_0.wav")]
    test = by_id(out / "audiocaps_test.json")
    t = test["audiocaps_test_yt9_20"]
    assert t.answer == "first caption" and t.references == ["first caption", "later caption"]
    assert len(test) == 2


def test_audiocaps_media_pattern_is_configurable(tmp_path):
    src, out = audiocaps_src(tmp_path), tmp_path / "out"
    touch(src / "clips" / "test" / "Yyt9.wav")
    touch(src / "clips" / "test" / "Yyt8.wav")
    convert("audiocaps", src, out, split="test", media_pattern="clips/{split}/Y{youtube_id}.wav")
    assert by_id(out / "audiocaps_test.json")["audiocaps_test_yt8_0"].media == str(src / "clips" / "test" / "Yyt8.wav")
    with pytest.raises(ConfigError, match="unknown field"):
        convert("audiocaps", src, out, split="test", media_pattern="{ytid}.wav")


def test_audiocaps_malformed_row_names_line(tmp_path):
    src = audiocaps_src(tmp_path)
    (src / "train.csv").write_text("audiocap_id,youtube_id,start_time,caption\n1,yt1,30,a dog\nx2,yt2,0,rain\n")
    with pytest.raises(DataError, match=r"train.csv: line 3: audiocap_id must be an integer"):
        convert("audiocaps", src, tmp_path / "out", split="train", media_dir=src / "wav")
    (src / "train.csv").write_text("audiocap_id,youtube_id,start_time,caption\n1,yt1\n")
    with pytest.raises(DataError, match=r"train.csv: line 2: expected 4 columns"):
        convert("audiocaps", src, tmp_path / "out", split="train", media_dir=src / "wav")


# ------------------------------------------------------------------------------- Clotho-AQA


def clotho_src(tmp_path, conf_col="Confidence"):
    src = tmp_path / "clotho"
    header = ["file_name", "QuestionText", "answer"] + ([conf_col] if conf_col else [])
    rows = [["a.wav", "is it raining?", "yes", "yes"], ["a.wav", "is it raining?", "no", "no"],
            ["a.wav", "is it raining?", "yes", "yes"], ["a.wav", "what makes the sound?", "rain", "maybe"],
            ["b.wav", "is it loud?", "no", "Yes"], ["gone.wav", "is it quiet?", "yes", "yes"]]
    for sp in ("train", "test"):
        write_csv(src / f"clotho_aqa_{sp}.csv", [r[:len(header)] for r in rows], header)
    for n in ("a.wav", "b.wav"):
        touch(src / "audio_files" / n)
    return src


def test_clotho_aqa_confidence_filter_and_missing(tmp_path):
    src, out = clotho_src(tmp_path), tmp_path / "out"
    with pytest.raises(DataError, match="gone.wav"):
        convert("clotho_aqa", src, out)
    convert("clotho_aqa", src, out, skip_missing=True)
    test = load_dataset(out / "clotho_aqa_test.json")
    by_q = {s.prompt: s for s in test}
    assert set(by_q) == {"<audio>\nis it raining?", "<audio>\nis it loud?"}  # 'maybe' dropped, gone.wav skipped
    assert by_q["<audio>\nis it raining?"].references == ["yes"]  # the 'no' answer had confidence no
    assert by_q["<audio>\nis it loud?"].media == str(src / "audio_files" / "b.wav")
    assert "gone.wav" in (out / "clotho_aqa_test.missing.txt").read_text()
    assert "confidence == yes" in record(out, "clotho_aqa_test")["filters"]
    # filter off: every answer kept, the most frequent is the target
    out2 = tmp_path / "out2"
    convert("clotho-aqa", src, out2, split="test", skip_missing=True, confidence_filter=False)
    by_q = {s.prompt: s for s in load_dataset(out2 / "clotho_aqa_test.json")}
    assert by_q["<audio>\nis it raining?"].answer == "yes"
    assert by_q["<audio>\nis it raining?"].references == ["yes", "no"]
    assert "<audio>\nwhat makes the sound?" in by_q


def test_clotho_aqa_without_confidence_column(tmp_path):
    src = clotho_src(tmp_path, conf_col=None)
    with pytest.raises(DataError) as e:
        convert("clotho_aqa", src, tmp_path / "out", split="test", skip_missing=True)
    assert "no confidence column" in str(e.value) and "QuestionText" in str(e.value)
    assert "--no-confidence-filter" in str(e.value)
    res = convert("clotho_aqa", src, tmp_path / "out", split="test", skip_missing=True, confidence_filter=False)
    assert res["test"]["samples"] == 3


def test_clotho_aqa_short_row_names_line(tmp_path):
    src = clotho_src(tmp_path)
    p = src / "clotho_aqa_train.csv"
    p.write_text(p.read_text() + "c.wav,is it?\n")
    with pytest.raises(DataError, match=r"clotho_aqa_train.csv: line 8: expected 4 columns"):
        convert("clotho_aqa", src, tmp_path / "out", split="train")


# ------------------------------------------------------------------------------- Cap3D


def cap3d_src(tmp_path, n=12):
    src = tmp_path / "cap3d"
    rows = [[f"uid{k:02d}", f"a small object number {k}"] for k in range(n)]
    rows.insert(3, ["longuid", "a " + "very " * 30 + "long caption"])  # >= 100 characters: filtered out
    write_csv(src / "Cap3D_automated_Objaverse_full.csv", rows)
    for k in range(n):
        if k == 0:
            touch(src / "objs" / f"uid{k:02d}.npz")  # second-choice layouts are found too
        elif k == 1:
            continue  # missing
        else:
            touch(src / "objs" / "8192_npy" / f"uid{k:02d}_8192.npy")
    touch(src / "objs" / "8192_npy" / "longuid_8192.npy")
    return src


def test_cap3d_short_captions_disjoint_seeded_split(tmp_path):
    src, out = cap3d_src(tmp_path), tmp_path / "out"
    with pytest.raises(DataError, match="uid01_8192.npy"):
        convert("cap3d", src, out, media_dir=src / "objs", limit=6)
    convert("cap3d", src, out, media_dir=src / "objs", limit=5, skip_missing=True, seed=1)
    rec_tr, rec_te = record(out, "cap3d_train"), record(out, "cap3d_test")
    tr_ids = {s.id.split("_", 2)[2] for s in load_dataset(out / "cap3d_train.json")}
    te_ids = {s.id.split("_", 2)[2] for s in load_dataset(out / "cap3d_test.json")}
    missing = (out / "cap3d_train.missing.txt").read_text() + (out / "cap3d_test.missing.txt").read_text()
    n_missing = rec_tr["missing_media"] + rec_te["missing_media"]
    assert n_missing == 1 and "uid01_8192.npy" in missing
    assert len(tr_ids) + len(te_ids) == 10 - n_missing  # 5 + 5 drawn from the 12 kept, one missing
    assert not tr_ids & te_ids and "longuid" not in tr_ids | te_ids
    counts = {c["step"]: c["count"] for c in rec_tr["counts"]}
    assert counts["captions under 100 characters"] == 12
    samples = load_dataset(out / "cap3d_train.json") + load_dataset(out / "cap3d_test.json")
    assert all(s.prompt == "<point>\nDescribe the 3D object briefly." for s in samples)
    media = {s.id.split("_", 2)[2]: s.media for s in samples}
    if "uid00" in media:
        assert media["uid00"] == str(src / "objs" / "uid00.npz")
    assert all(m.startswith(str(src / "objs")) for m in media.values())
    # reproducible: the same seed draws the same objects for a lone split
    out2 = tmp_path / "out2"
    convert("cap3d", src, out2, split="test", media_dir=src / "objs", limit=5, skip_missing=True, seed=1)
    assert (out2 / "cap3d_test.json").read_text() == (out / "cap3d_test.json").read_text()


def test_cap3d_malformed_row_names_line(tmp_path):
    src = cap3d_src(tmp_path)
    p = src / "Cap3D_automated_Objaverse_full.csv"
    p.write_text(p.read_text() + "justauid\n")
    with pytest.raises(DataError, match=r"Cap3D_automated_Objaverse_full.csv: line 14: expected 2 columns"):
        convert("cap3d", src, tmp_path / "out", media_dir=src / "objs", limit=2, skip_missing=True)


# ------------------------------------------------------------------------------- Cap3D-QA


def test_cap3d_qa_columns_by_name_and_object_disjoint_split(tmp_path):
    src, out = tmp_path / "c3qa", tmp_path / "out"
    rows = [[f"o{k % 4}", f"caption {k}", f"what is object {k}?", f"answer {k}"] for k in range(12)]
    write_csv(src / "CAP3DQA_final.csv", rows, ["Sample_ID", "caption", "Question", "Answer"])
    for k in range(4):
        touch(src / "8192_npy" / f"o{k}_8192.npy")
    convert("cap3d_qa", src, out, limit=3, seed=2)
    train, test = load_dataset(out / "cap3d_qa_train.json"), load_dataset(out / "cap3d_qa_test.json")
    assert len(train) == 3 and 1 <= len(test) <= 3
    assert not {s.meta["uid"] for s in train} & {s.meta["uid"] for s in test}
    s = train[0]
    k = s.meta["row"]
    assert s.prompt == f"<point>\nwhat is object {k}?" and s.answer == f"answer {k}"
    assert s.media == str(src / "8192_npy" / f"o{k % 4}_8192.npy")


def test_cap3d_qa_missing_column_lists_columns_found(tmp_path):
    src = tmp_path / "c3qa"
    write_csv(src / "CAP3DQA_final.csv", [["o1", "q?", "a"]], ["uid", "question", "answer"])
    with pytest.raises(DataError) as e:
        convert("cap3d_qa", src, tmp_path / "out")
    assert "['sample_id']" in str(e.value) and "columns found: ['uid', 'question', 'answer']" in str(e.value)


# ------------------------------------------------------------------------------- registry and CLI


def test_unknown_set_lists_known_sets(tmp_path):
    with pytest.raises(MeraError) as e:
        convert("coco-karpathy", tmp_path, tmp_path / "out")
    for name in KNOWN_SETS:
        assert name in str(e.value)
    assert len(KNOWN_SETS) == 8


def test_convert_command_through_argparse(tmp_path, capsys):
    src, out = coco_src(tmp_path), tmp_path / "out"
    p = argparse.ArgumentParser(prog="mera")
    data_cli.add_parser(p.add_subparsers(dest="command", required=True))
    args = p.parse_args(["data", "convert", "MSCOCO", "--src", str(src), "--out", str(out), "--split", "test",
                         "--limit", "2", "--seed", "7"])
    assert args.func is data_cli.run and data_cli.run(args) == 0
    assert "2 samples" in capsys.readouterr().out
    assert record(out, "mscoco_test")["seed"] == 7 and len(load_dataset(out / "mscoco_test.json")) == 2
