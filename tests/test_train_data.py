"""Training data and options: every dataset format yields the same samples; bad entries are skipped
and counted; the per-process order is resumable and independent of worker count; flags and YAML."""

from __future__ import annotations

import gzip
import io
import json
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from llmdiff_core.errors import LLMDiffError
from llmdiff_core.training import data as D, sources as S
from llmdiff_core.training.options import OptionsError, build_parser, parse_options
from train_support import make_images, make_shaped_images, write_csv, write_folder, write_jsonl, write_tars

RES = 32


def _one_pass(source, **kw) -> list[D.Item]:
    spec = D.StreamSpec(seed=0, shuffle=False, resolution=RES, epochs=1, **kw)
    return list(D.iterate(source, spec, D.Position()))


@pytest.fixture(scope="module")
def samples():
    return make_images(7)


def test_every_format_yields_the_same_samples(tmp_path: Path, samples) -> None:
    sources = {
        "folder": S.open_source(str(write_folder(tmp_path / "f", samples))),
        "jsonl": S.open_source(str(write_jsonl(tmp_path / "j", samples)), image_root=str(tmp_path / "j" / "images")),
        "csv": S.open_source(str(write_csv(tmp_path / "c", samples))),
        "tar": S.open_source(str(write_tars(tmp_path / "t", samples, per_shard=3))),
        "tar-json": S.open_source(str(write_tars(tmp_path / "tj", samples, per_shard=2, json_captions=True))),
        "tar-pattern": S.open_source(str(tmp_path / "t" / "shard-{000..002}.tar")),
    }
    runs = {name: _one_pass(src) for name, src in sources.items()}
    ref = runs["folder"]
    assert [it.key for it in ref] == [k for k, _, _ in samples]
    assert all(it.problem is None for it in ref)
    for name, items in runs.items():
        assert [it.key for it in items] == [it.key for it in ref], name
        assert [it.caption for it in items] == [it.caption for it in ref], name
        for a, b in zip(items, ref):
            assert a.pixels.shape == (RES, RES, 3)
            assert torch.equal(a.pixels, b.pixels), (name, a.key)
            assert a.original_size == b.original_size and a.crop_top_left == b.crop_top_left


def test_broken_entries_are_skipped_and_counted(tmp_path: Path, samples) -> None:
    root = write_folder(tmp_path / "f", samples)
    (root / "img_001.png").write_bytes(b"not a png at all")  # corrupt image
    (root / "img_002.txt").unlink()  # missing caption
    (root / "img_003.png").write_bytes((root / "img_003.png").read_bytes()[:60])  # truncated file
    items = _one_pass(S.open_source(str(root)))
    problems = {it.key: it.problem for it in items if it.problem}
    assert set(problems) == {"img_001", "img_002", "img_003"}
    assert problems["img_002"] == "missing caption"
    assert problems["img_001"].startswith("unreadable image")
    counter = D.SkipCounter()
    for k, p in problems.items():
        counter.add(k, p)
    assert counter.total == 3 and counter.counts == {"unreadable image": 2, "missing caption": 1}

    manifest = tmp_path / "m.jsonl"
    manifest.write_text("\n".join([
        json.dumps({"image": str(root / "img_000.png"), "caption": "ok"}),
        "{this is not json",
        json.dumps({"image": str(root / "img_004.png")}),
        json.dumps({"caption": "no image"}),
        json.dumps({"image": str(root / "missing.png"), "caption": "gone"}),
    ]) + "\n")
    items = _one_pass(S.open_source(str(manifest)))
    assert [it.problem is None for it in items] == [True, False, False, False, False]
    assert "bad JSON" in items[1].problem and items[2].problem == "missing caption"

    tars = write_tars(tmp_path / "t", samples, per_shard=4)
    with tarfile.open(tars / "shard-000.tar", "a") as tf:  # an entry with no caption
        info = tarfile.TarInfo("lonely.png")
        png = samples[0][1]
        info.size = len(png)
        import io
        tf.addfile(info, io.BytesIO(png))
    (tars / "shard-009.tar").write_bytes(b"garbage, not a tar")
    items = _one_pass(S.open_source(str(tars)))
    bad = {it.key: it.problem for it in items if it.problem}
    assert bad["lonely"] == "missing caption"
    assert any("unreadable shard" in p for p in bad.values())
    assert sum(it.problem is None for it in items) == len(samples)


def _member_offsets(shard: Path) -> dict[str, tuple[int, int]]:
    with tarfile.open(shard) as tf:
        return {m.name: (m.offset, m.offset_data) for m in tf}


def test_a_cut_off_shard_keeps_what_was_read_and_says_so(tmp_path: Path, samples) -> None:
    """A partial download: the entries before the cut train, the shard is counted as damaged, nothing raises."""
    def read(tars: Path, pattern: str = "") -> dict[str, str | None]:
        items = _one_pass(S.open_source(str(tars / pattern) if pattern else str(tars)))
        return {it.key.replace(str(tars), "<dir>"): it.problem for it in items}

    tars = write_tars(tmp_path / "t", samples, per_shard=4)
    whole = (tars / "shard-000.tar").read_bytes()
    header = _member_offsets(tars / "shard-000.tar")["img_002.png"][0]
    later = {f"img_00{i}": None for i in range(4, 7)}  # the second shard's entries, untouched
    # tarfile ends its iteration without an error when the cut falls at or inside a header: only the missing
    # end-of-archive blocks tell
    for cut in (header, header + 100):
        (tars / "shard-000.tar").write_bytes(whole[:cut])
        got = read(tars)
        assert got.pop("<dir>/shard-000.tar#truncated").startswith("shard is damaged: it ends without the end")
        assert got == {"img_000": None, "img_001": None, **later}, cut

    # the caption before the image (as some writers order them), the shard cut inside the image's bytes
    tars = write_tars(tmp_path / "c", samples, per_shard=4, caption_first=True)
    image = _member_offsets(tars / "shard-000.tar")["img_003.png"][1]
    (tars / "shard-000.tar").write_bytes((tars / "shard-000.tar").read_bytes()[:image + 20])
    got = read(tars)
    assert got.pop("img_003").startswith("unreadable image: cut off in its shard")
    assert got.pop("<dir>/shard-000.tar#truncated").startswith("shard is damaged")
    assert got == {"img_000": None, "img_001": None, "img_002": None, **later}

    # a compressed shard cut halfway: the decompressor's EOFError is a damaged shard, not a crash
    tars = write_tars(tmp_path / "z", samples, per_shard=4)
    for shard in sorted(tars.glob("*.tar")):
        gz = gzip.compress(shard.read_bytes())
        shard.with_suffix(".tar.gz").write_bytes(gz[:len(gz) // 2] if shard.name == "shard-000.tar" else gz)
    got = read(tars, "shard-{000..001}.tar.gz")
    assert "Compressed file ended" in got.pop("<dir>/shard-000.tar.gz#truncated")
    assert got.pop("img_000") is None and all(k.startswith("img_00") for k in got)  # (the cut entry is counted)
    assert {k: got[k] for k in later} == later


def test_manifests_and_captions_with_a_byte_order_mark_read_as_plain_utf8(tmp_path: Path, samples) -> None:
    """Excel's "CSV UTF-8" and Notepad start their files with a byte-order mark; it is no column name or text."""
    bom = b"\xef\xbb\xbf"
    csv_path = write_csv(tmp_path / "c", samples[:3])
    jsonl_path = write_jsonl(tmp_path / "j", samples[:3])
    folder = write_folder(tmp_path / "f", samples[:3])
    tars = write_tars(tmp_path / "t", samples[:3])
    for path in (csv_path, jsonl_path, folder / "img_000.txt"):
        path.write_bytes(bom + path.read_bytes())
    with tarfile.open(tars / "shard-000.tar") as tf:
        members = [(m, tf.extractfile(m).read()) for m in tf]
    with tarfile.open(tars / "shard-000.tar", "w") as tf:
        for m, data in members:
            data = bom + data if m.name == "img_000.txt" else data
            m.size = len(data)
            tf.addfile(m, io.BytesIO(data))
    images = str(jsonl_path.parent / "images")
    for source in (S.open_source(str(csv_path)), S.open_source(str(jsonl_path), image_root=images),
                   S.open_source(str(folder)), S.open_source(str(tars))):
        items = _one_pass(source)
        assert [(it.key, it.problem, it.caption) for it in items] == [(k, None, c) for k, _, c in samples[:3]], source


def test_a_manifest_in_another_encoding_is_refused_by_name(tmp_path: Path, samples) -> None:
    for path in (write_csv(tmp_path / "c", samples[:2]), write_jsonl(tmp_path / "j", samples[:2])):
        path.write_bytes(path.read_bytes().replace(b"red", "r\u00e9d".encode("latin-1")))  # a Latin-1 "é"
        with pytest.raises(LLMDiffError, match="is not UTF-8 text .*byte 0xe9.*save it as UTF-8") as info:
            S.open_source(str(path))
        assert str(path) in str(info.value)


def test_a_dataset_without_one_usable_entry_is_refused_at_the_start_with_the_likely_cause(tmp_path: Path,
                                                                                         samples) -> None:
    """Captions beside the images under another name, or manifest fields under other names, would otherwise have the
    run skip every entry one by one until it gives up."""
    folder = write_folder(tmp_path / "f", samples[:3])
    for txt in folder.glob("*.txt"):
        txt.rename(txt.with_suffix(".caption"))  # kohya's sd-scripts' name: read as well
    items = _one_pass(S.open_source(str(folder)))
    assert [(it.key, it.problem, it.caption) for it in items] == [(k, None, c) for k, _, c in samples[:3]]
    for caption in folder.glob("*.caption"):
        caption.rename(caption.with_suffix(".md"))
    with pytest.raises(LLMDiffError, match="has 3 images but not one caption: each image needs a same-name caption "
                                           "file beside it \\(.txt or .caption"):
        S.open_source(str(folder))

    manifest = tmp_path / "m.csv"
    manifest.write_text("filename,description\n" + "".join(f"{folder / k}.png,{c}\n" for k, _, c in samples[:3]))
    with pytest.raises(LLMDiffError, match="not one line of .* can be used \\(3 x manifest line has no image path\\)"
                                           "\\. Its fields are filename, description: name the one to use with "
                                           "--image-column \\(by default the first of image, file_name"):
        S.open_source(str(manifest))
    with pytest.raises(LLMDiffError, match="\\(3 x missing caption\\)\\. Its fields are filename, description: "
                                           "name the one to use with --caption-column"):
        S.open_source(str(manifest), image_column="filename")
    items = _one_pass(S.open_source(str(manifest), image_column="filename", caption_column="description"))
    assert [(it.problem, it.caption) for it in items] == [(None, c) for _, _, c in samples[:3]]

    lines = tmp_path / "m.jsonl"
    lines.write_text("".join(json.dumps({"img": f"{folder / k}.png", "caption": c}) + "\n" for k, _, c in samples[:3]))
    with pytest.raises(LLMDiffError, match="Its fields are img, caption: name the one to use with --image-column"):
        S.open_source(str(lines))


def test_a_list_of_captions_gives_one_of_them_per_epoch(tmp_path: Path, samples) -> None:
    """COCO-style manifests hold several captions per image: one is drawn per epoch (the same in every process and
    format), never the list's text."""
    lines = write_jsonl(tmp_path / "j", samples[:3])
    several = ["a red square", "a crimson box", "red on blue", "a square, red"]
    rows = [json.loads(line) for line in lines.read_text().splitlines()]
    rows[0]["caption"], rows[1]["caption"] = several, [7, "  ", "only this one"]
    rows[2]["caption"] = [None, ""]
    lines.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tars = write_tars(tmp_path / "t", samples[:1], json_captions=True)
    with tarfile.open(tars / "shard-000.tar") as tf:
        png = tf.extractfile("img_000.png").read()
    with tarfile.open(tars / "shard-000.tar", "w") as tf:
        for name, data in (("img_000.png", png), ("img_000.json", json.dumps({"caption": several}).encode())):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))

    source = S.open_source(str(lines), image_root=str(lines.parent / "images"))
    drawn = []
    for epoch in range(12):
        spec = D.StreamSpec(seed=0, shuffle=False, resolution=RES, epochs=epoch + 1)
        items = [it for it in D.iterate(source, spec, D.Position()) if it.epoch == epoch]
        assert [(it.key, it.problem) for it in items] == [("img_000", None), ("img_001", None),
                                                          ("img_002", "missing caption")]
        assert items[1].caption == "only this one"
        drawn.append(items[0].caption)
        from_tar = [it for it in D.iterate(S.open_source(str(tars)), spec, D.Position()) if it.epoch == epoch]
        assert from_tar[0].caption == items[0].caption  # (the draw follows the sample's key, not the format)
    assert set(drawn) <= set(several) and len(set(drawn)) > 1, drawn


def test_a_missing_dataset_is_named_before_any_model_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from llmdiff_core.training import runner

    monkeypatch.setattr(runner, "make_accelerator", lambda opts: None)
    monkeypatch.setattr(runner, "load_components", lambda *a: pytest.fail("the models loaded first"))
    opts = parse_options(["--base-model", "x.safetensors", "--llm", "llm", "--data", str(tmp_path / "gone"),
                          "--output-dir", str(tmp_path / "out")])
    with pytest.raises(LLMDiffError, match=f"dataset '{tmp_path / 'gone'}' does not exist"):
        runner.run(opts)  # (the script prints an LLMDiffError's message, not a traceback)


def test_order_is_resumable_sharded_and_worker_independent(tmp_path: Path, samples) -> None:
    src = S.open_source(str(write_folder(tmp_path / "f", samples)))
    spec = D.StreamSpec(seed=3, shuffle=True, resolution=RES)
    stream = D.iterate(src, spec, D.Position())
    first = [next(stream) for _ in range(17)]  # crosses two epoch boundaries (7 per epoch)
    assert sorted(it.key for it in first[:7]) == sorted(k for k, _, _ in samples)
    assert [it.key for it in first[:7]] != [it.key for it in first[7:14]]  # reshuffled per epoch
    resumed = D.iterate(src, spec, D.Position(first[9].epoch, first[9].position))
    assert [it.key for it in first[10:]] == [next(resumed).key for _ in range(7)]

    # two processes together see exactly the single process's samples
    r0 = D.iterate(src, D.StreamSpec(seed=3, shuffle=True, resolution=RES, rank=0, world=2), D.Position())
    r1 = D.iterate(src, D.StreamSpec(seed=3, shuffle=True, resolution=RES, rank=1, world=2), D.Position())
    a, b = [next(r0).key for _ in range(3)], [next(r1).key for _ in range(3)]
    assert [k for pair in zip(a, b) for k in pair] == [it.key for it in first[:6]]

    # any number of data-loader workers gives the stream order
    loaded = D.loader(D.SampleStream(src, spec, D.Position()), num_workers=2)
    assert [next(loaded).key for _ in range(9)] == [it.key for it in first[:9]]


def test_aspect_buckets_give_each_image_its_nearest_size_covered_and_cropped(tmp_path: Path) -> None:
    from llmdiff_core.training.buckets import bucket_sizes

    buckets = bucket_sizes(64, 16, 2.0)
    assert buckets == ((64, 64), (48, 80), (80, 48))  # (height, width): square, landscape, portrait
    sizes = [(40, 40), (48, 40), (56, 40), (40, 56), (120, 40), (40, 41)]  # (width, height)
    src = S.open_source(str(write_folder(tmp_path / "f", make_shaped_images(sizes))))
    items = list(D.iterate(src, D.StreamSpec(seed=0, shuffle=False, resolution=64, epochs=1, buckets=buckets),
                           D.Position()))
    # 1.2 : 1 is nearer square than 80 : 48; 1.4 : 1 nearer it; 3 : 1 goes to the most elongated, cropped
    assert [it.bucket for it in items] == [(64, 64), (64, 64), (48, 80), (80, 48), (48, 80), (64, 64)]
    for it, (w, h) in zip(items, sizes):
        th, tw = it.bucket
        assert it.pixels.shape == (th, tw, 3) and it.original_size == (h, w)
        scale = max(tw / w, th / h)  # covers the bucket: one side fits exactly, the other is cropped
        nw, nh = max(tw, round(w * scale)), max(th, round(h * scale))
        assert it.crop_top_left == ((nh - th) // 2, (nw - tw) // 2)
        assert (nw == tw) or (nh == th)
    assert items[4].crop_top_left == (0, 32)  # 120 x 40 -> 144 x 48, the middle 80 across
    wide = Image.open(io.BytesIO(make_shaped_images(sizes)[4][1])).resize((144, 48), Image.LANCZOS)
    wide = wide.crop((32, 0, 112, 48))
    assert torch.equal(items[4].pixels, torch.from_numpy(np.asarray(wide, dtype=np.float32) / 255.0))


@pytest.mark.parametrize("workers", [0, 2])
def test_a_stream_resumed_with_entries_waiting_reads_them_again_and_passes_over_the_rest(tmp_path: Path, samples,
                                                                                         workers: int) -> None:
    """A position with waiting entries (read, not yet trained on: their bucket's batch was not full) restarts the
    stream at the earliest of them; the entries between that were trained on come back as AlreadyTrained markers
    (not decoded), the waiting ones decoded as before, then the stream goes on; the same with loader workers."""
    src = S.open_source(str(write_folder(tmp_path / "f", samples)))
    spec = D.StreamSpec(seed=3, shuffle=True, resolution=RES)
    stream = D.iterate(src, spec, D.Position())
    first = [next(stream) for _ in range(12)]  # epoch 0 (7 entries), then 5 of epoch 1
    waiting = ((0, first[5].position), (1, first[8].position))  # across the epoch boundary
    start = D.Position(first[10].epoch, first[10].position, waiting)
    assert start.restart() == (0, first[5].position - 1)
    decoded: list[str] = []
    original = D.decode_entry

    def counting(entry, *args):
        decoded.append(entry.key)
        return original(entry, *args)
    resumed = D.loader(D.SampleStream(src, spec, start, counting), num_workers=workers)
    got = [next(resumed) for _ in range(8)]  # entries 5..10 again, then 11 and 12
    assert [type(g).__name__ for g in got] == ["Item", "AlreadyTrained", "AlreadyTrained", "Item", "AlreadyTrained",
                                               "AlreadyTrained", "Item", "Item"]
    assert [(g.epoch, g.position) for g in got[:6]] == [(it.epoch, it.position) for it in first[5:11]]
    for g, want in zip((got[0], got[3]), (first[5], first[8])):
        assert g.key == want.key and torch.equal(g.pixels, want.pixels)
    assert got[6].key == first[11].key
    if workers == 0:  # (workers decode in their own processes)
        assert decoded == [first[5].key, first[8].key, first[11].key, got[7].key]
    assert D.Position.from_dict(start.to_dict()) == start
    assert D.Position.from_dict({"epoch": 2, "consumed": 4}) == D.Position(2, 4)  # a checkpoint from before


def test_tar_shards_split_by_process(tmp_path: Path, samples) -> None:
    src = S.open_source(str(write_tars(tmp_path / "t", samples, per_shard=2)))  # 4 shards
    keys = []
    for rank in range(2):
        spec = D.StreamSpec(seed=0, shuffle=True, resolution=RES, rank=rank, world=2, epochs=1, shuffle_buffer=3)
        keys.append([it.key for it in D.iterate(src, spec, D.Position())])
    assert not set(keys[0]) & set(keys[1])
    assert sorted(keys[0] + keys[1]) == sorted(k for k, _, _ in samples)


REQUIRED = ["--base-model", "a", "--llm", "b", "--data", "c"]


def test_options_flags_win_over_yaml(tmp_path: Path) -> None:
    cfg = tmp_path / "run.yaml"
    cfg.write_text("base_model: a.safetensors\nllm: llm\ndata: d\nlr: 0.002\nbatch-size: 3\n"
                   "validation_prompts: [a cat, a dog]\ngradient_checkpointing: true\n")
    opts = parse_options(["--config", str(cfg), "--lr", "0.005"])
    assert opts.lr == 0.005 and opts.batch_size == 3 and opts.gradient_checkpointing
    assert opts.validation_prompts == ["a cat", "a dog"]
    cfg.write_text("base_model: a\nllm: b\ndata: c\nlearning_rate: 1\n")
    with pytest.raises(OptionsError, match="unknown option 'learning_rate'"):
        parse_options(["--config", str(cfg)])
    with pytest.raises(OptionsError, match="--base-model"):
        parse_options(["--llm", "x", "--data", "y"])
    with pytest.raises(OptionsError, match="--compile-mode needs --compile-unet"):
        parse_options(REQUIRED + ["--compile-mode", "max-autotune"])
    assert parse_options(REQUIRED).compile_whole_bucket  # (with compile)
    assert not parse_options(REQUIRED + ["--compile-unet", "inductor",
                                         "--no-compile-whole-bucket"]).compile_whole_bucket
    assert parse_options(REQUIRED + ["--compile-unet", "inductor", "--no-prefetch",
                                     "--channels-last"]).compile_unet == "inductor"
    assert parse_options(REQUIRED).cudnn_benchmark
    from llmdiff_core.training.options import validation_size
    for given, want in (("", (512, 512)), ("768", (768, 768)), ("1216x832", (832, 1216)), (" 64 X 48 ", (48, 64))):
        assert validation_size(parse_options(REQUIRED + ["--validation-size", given]), 512) == want, given
    cfg.write_text("base_model: a\nllm: b\ndata: c\nvalidation_size: 768\n")  # (a YAML number: as before)
    assert validation_size(parse_options(["--config", str(cfg)]), 1024) == (768, 768)
    assert not parse_options(REQUIRED + ["--no-cudnn-benchmark"]).cudnn_benchmark
    assert parse_options(REQUIRED + ["--sdpa-backends", "flash, Efficient"]).sdpa_backends == "flash, Efficient"
    for bad, why in (("flash,flsh", "unknown SDPA backend.s. flsh"), ("cudnn,cudnn", "named twice")):
        with pytest.raises(OptionsError, match=f"--sdpa-backends: .*{why}"):
            parse_options(REQUIRED + ["--sdpa-backends", bad])


@pytest.mark.parametrize("flags, message", [
    (["--caption-dropout", "1.5"], "--caption-dropout must be between 0 and 1"),
    (["--ema-decay", "1"], r"--ema-decay must be in \[0, 1\)"),
    (["--resolution", "500"], "--resolution must be a multiple of 8"),
    (["--validation-size", "100"], "--validation-size '100': each side must be a multiple of 8"),
    (["--validation-size", "1216x830"], "--validation-size '1216x830': each side must be a multiple of 8"),
    (["--validation-size", "1216x"], "--validation-size '1216x': give N .a square. or WIDTHxHEIGHT"),
    (["--cache-only"], "--cache-only needs --cache-dir"),
    (["--batch-size", "0"], "--batch-size must be at least 1"),
    (["--max-tokens", "0"], "--max-tokens must be at least 1"),
    (["--clip-stop-at-layer", "2"], "--clip-stop-at-layer must be between -24 and -1"),
    (["--clip-stop-at-layer", "-25"], "--clip-stop-at-layer must be between -24 and -1"),
    (["--aspect-buckets", "--bucket-step", "60"], "--bucket-step must be a multiple of 8 that divides the resolution"),
    (["--aspect-buckets", "--resolution", "520"], "--bucket-step must be a multiple of 8 that divides the resolution"),
    (["--aspect-buckets", "--bucket-max-ratio", "0.5"], "--bucket-max-ratio is the long side over the short side"),
])
def test_bad_option_values_are_refused_by_name(flags: list[str], message: str) -> None:
    with pytest.raises(OptionsError, match=message):
        parse_options(REQUIRED + flags)


@pytest.mark.parametrize("text, message", [
    ("lr: [0.1", "is not valid YAML"),
    ("- lr\n- 0.1\n", "must be a mapping of option: value"),
    ("lr: fast", "'lr' in .* must be a float, got 'fast'"),
    ("gradient_checkpointing: 3", "'gradient_checkpointing' in .* must be true or false, got 3"),
    ("crop: left", "'crop' in .* must be one of center, random, got 'left'"),
    ("config: other.yaml", "unknown option 'config'"),
])
def test_a_bad_config_file_is_refused_by_name(tmp_path: Path, text: str, message: str) -> None:
    cfg = tmp_path / "run.yaml"
    cfg.write_text(text)
    with pytest.raises(OptionsError, match=message):
        parse_options(REQUIRED + ["--config", str(cfg)])
    with pytest.raises(OptionsError, match="cannot read the config file"):
        parse_options(REQUIRED + ["--config", str(tmp_path / "missing.yaml")])


def test_sdpa_backends_on_a_torch_without_priorities_get_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch before 2.6 has no sdpa_kernel(set_priority=...): the option says so instead of a TypeError."""
    import contextlib

    import torch.nn.attention as attention

    from llmdiff_core.errors import LLMDiffError
    from llmdiff_core.training.sdpa_backends import use_backends

    @contextlib.contextmanager
    def old_sdpa_kernel(backends: Any):  # torch 2.5's signature
        yield
    monkeypatch.setattr(attention, "sdpa_kernel", old_sdpa_kernel)
    with pytest.raises(LLMDiffError, match="--sdpa-backends needs torch 2.6"):
        use_backends(["flash"])
    assert use_backends([])() is None  # nothing asked: nothing to check


def test_help_documents_every_option_with_its_default() -> None:
    parser = build_parser()
    text = parser.format_help()
    for action in parser._actions:
        if action.dest in ("help",):
            continue
        assert action.help, action.dest
        assert "default:" in parser._get_formatter()._get_help_string(action) or "(default" in text
    assert text.count("(default:") >= len([a for a in parser._actions if a.dest != "help"])


# --- the cache's compact batches (issue 5: bytes per step) ---------------------------------------

def _features(spec, lengths: list[int], max_tokens: int, seed: int):
    from llmdiff_core.features import LLMFeatures

    g = torch.Generator().manual_seed(seed)
    B, L, D = len(lengths), spec.num_layers, spec.hidden_size
    hidden = torch.zeros(B, L + 1, max_tokens, D)
    scores = torch.zeros(B, L, max_tokens, D)
    mask = torch.zeros(B, max_tokens, dtype=torch.bool)
    for i, n in enumerate(lengths):
        hidden[i, :, :n] = torch.randn(L + 1, n, D, generator=g)
        scores[i, :, :n] = torch.randn(L, n, D, generator=g)
        mask[i, 1:n] = True
        mask[i, 0] = n == 1
    return LLMFeatures(spec, hidden, scores, mask)


@pytest.mark.parametrize("mode", ["score", "score-zeros", "last", "mean", "layer"])
@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
@pytest.mark.parametrize(("lengths", "empty_length"), [([5, 1, 7, 3], 1), ([1, 2, 1, 2], 3)],
                         ids=["captions", "an empty prompt longer than the batch's captions"])
def test_compact_cache_batches_expand_to_the_padded_features(mode: str, dtype: str, lengths: list[int],
                                                            empty_length: int) -> None:
    """collate (stored layers, stored dtype, batch-longest tokens) + caption dropout in place +
    expand_features on the device give exactly the values the encoding reads from the old
    full-size batch (every layer, float32, padded to the bucket), in fewer bytes."""
    from llmdiff_core.features import LLMFeatures, LLMSpec
    from llmdiff_core.training import encoders as E, feature_cache as FC

    spec = LLMSpec("llama", "t", 16, 3)
    T = 12
    layers, scores, read = {"score": ([0], True, [0]), "score-zeros": ([], True, []), "last": ([3], False, [3]),
                            "mean": ([1, 2, 3], False, [1, 2, 3]), "layer": ([2], False, [2])}[mode]
    cspec = FC.CacheSpec(fingerprint={}, llm=spec, max_tokens=T, layers=layers, scores=scores, dtype=dtype)
    feats = _features(spec, lengths, T, 0)
    cond = E.Conditioning([f"k{i}" for i in range(4)], torch.zeros(4, 4, 2, 2), feats, None, None, [(0, 0, 0, 0)] * 4)
    samples = [FC.CachedSample(f"k{i}", i, 0, i + 1, "", (0, 0, 0, 0), FC._record(cond, i, cspec, FC.DTYPES[dtype]))
               for i in range(4)]
    e_cond = E.Conditioning([""], torch.zeros(1, 0), _features(spec, [empty_length], T, 1), None, None,
                            [(0, 0, 0, 0)])
    e_rec = FC._record(e_cond, 0, cspec, FC.DTYPES[dtype])
    e_rec.pop("latent")
    empty = (FC.features_from(e_rec, cspec), None, None)
    drop = [False, True, False, True]

    # before: every row rebuilt at full size, then dropped rows swapped in by select + cat
    old = LLMFeatures.cat([FC.features_from(s.tensors, cspec) for s in samples])
    old = LLMFeatures.cat([empty[0] if d else old.select([i]) for i, d in enumerate(drop)])

    batch = FC.collate(samples, cspec)
    compact = batch.features
    assert isinstance(compact, E.CompactFeatures)
    assert compact.num_tokens == max(lengths) and compact.hidden.dtype == FC.DTYPES[dtype]
    stored = compact.hidden.nbytes + (0 if compact.scores is None else compact.scores.nbytes)
    assert stored * (2 if dtype == "bf16" else 1) < old.hidden.nbytes + old.scores.nbytes
    batch = E.drop_captions(batch, drop, empty)
    new = E.expand_features(spec, batch.features.hidden, batch.features.scores, batch.features.mask,
                            batch.features.layers, batch.features.max_tokens)
    assert new.hidden.shape == old.hidden.shape and new.hidden.dtype == torch.float32
    assert torch.equal(new.mask, old.mask)
    for k in read:
        assert torch.equal(new.hidden[:, k], old.hidden[:, k]), k
    if mode == "mean":
        assert torch.equal(new.hidden[:, 1:].mean(dim=1), old.hidden[:, 1:].mean(dim=1))
    if scores:
        assert torch.equal(new.scores, old.scores)
    # rows and the per-row select the training forward does keep the layer broadcast a view
    row = new.select([2])
    for k in read:
        assert torch.equal(row.hidden[:, k], old.hidden[2:3, k])
    if len(layers) == 1:
        assert row.hidden.stride(1) == 0 and new.to("cpu").hidden.stride(1) == 0


def test_dropped_captions_take_the_empty_prompt_in_every_input() -> None:
    """Encoded on the fly (no feature cache): a dropped row's LLM features, CLIP conditioning and pooled
    output all become the empty prompt's; the other rows stay as they are."""
    from llmdiff_core.features import LLMSpec
    from llmdiff_core.training import encoders as E

    spec = LLMSpec("llama", "t", 16, 3)
    feats, empty = _features(spec, [5, 1, 7, 3], 12, 0), _features(spec, [1], 12, 1)
    g = torch.Generator().manual_seed(2)
    clip, pooled = torch.randn(4, 77, 8, generator=g), torch.randn(4, 6, generator=g)
    e_clip, e_pooled = torch.randn(1, 154, 8, generator=g), torch.randn(1, 6, generator=g)  # a longer empty prompt
    before = (feats.hidden.clone(), feats.scores.clone(), feats.mask.clone())
    cond = E.Conditioning([f"k{i}" for i in range(4)], torch.zeros(4, 4, 2, 2), feats, clip, pooled, [(0, 0, 0, 0)] * 4)
    drop = [False, True, False, True]
    got = E.drop_captions(cond, drop, (empty, e_clip, e_pooled))
    for i, d in enumerate(drop):
        want = (empty.hidden[0], empty.scores[0], empty.mask[0]) if d else tuple(t[i] for t in before)
        assert all(torch.equal(a, b) for a, b in zip((got.features.hidden[i], got.features.scores[i],
                                                      got.features.mask[i]), want)), i
        assert torch.equal(got.clip[i], (e_clip[0] if d else clip[i].repeat(2, 1)))  # 77 -> 154 tokens, repeated
        assert torch.equal(got.pooled[i], e_pooled[0] if d else pooled[i])
    with pytest.raises(ValueError, match="do not fit"):
        E.drop_captions(cond, drop, (_features(spec, [1], 16, 1), None, None))

def test_feature_rows_keep_broadcast_views_and_values() -> None:
    """LLMFeatures.select / cat / to on a layer-broadcast batch: the values of a materialised copy."""
    from llmdiff_core.features import LLMFeatures, LLMSpec

    spec = LLMSpec("llama", "t", 8, 4)
    base = torch.randn(3, 1, 5, 8)
    f = LLMFeatures(spec, base.expand(3, 5, 5, 8), torch.randn(3, 4, 5, 8), torch.rand(3, 5) > 0.5)
    full = LLMFeatures(spec, f.hidden.contiguous(), f.scores, f.mask)
    for rows in ([2, 0], [1], [0, 1, 2], [1, 1, 0]):
        a, b = f.select(rows), full.select(rows)
        assert torch.equal(a.hidden, b.hidden) and torch.equal(a.scores, b.scores) and torch.equal(a.mask, b.mask)
    assert f.select([0, 1, 2]).hidden is f.hidden  # every row in order: no copy
    both = LLMFeatures.cat([f.select([1]), f.select([0, 2])])
    assert both.hidden.stride(1) == 0 and torch.equal(both.hidden, full.select([1, 0, 2]).hidden)
    mixed = LLMFeatures.cat([f.select([1]), full.select([0])])
    assert torch.equal(mixed.hidden, full.select([1, 0]).hidden)
    assert LLMFeatures.cat([f]).hidden is f.hidden
    moved = f.to("cpu", torch.float64)
    assert moved.hidden.stride(1) == 0 and torch.equal(moved.hidden, full.hidden.double())


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_cache_features_are_read_straight_into_the_batch_buffer(tmp_path: Path, dtype: str) -> None:
    """A finished cache hands out hidden/scores as places in the shard (StoredTensor: a few picklable
    fields, so DataLoader workers no longer ship megabytes through shared memory); collate reads them into
    the batch buffer and gets exactly what copying the tensors gives."""
    import pickle
    from types import SimpleNamespace

    from llmdiff_core.features import LLMSpec
    from llmdiff_core.training import encoders as E, feature_cache as FC
    from llmdiff_core.training.stored_tensor import StoredTensor, stored_tensors

    spec = LLMSpec("llama", "t", 16, 3)
    T, lengths = 12, [5, 1, 7, 3]
    cspec = FC.CacheSpec(fingerprint={}, llm=spec, max_tokens=T, layers=[0], scores=True, dtype=dtype)
    cond = E.Conditioning([f"k{i}" for i in range(4)], torch.randn(4, 4, 2, 2), _features(spec, lengths, T, 0),
                          None, None, [(8, 8, 0, 0)] * 4)
    records = [FC._record(cond, i, cspec, FC.DTYPES[dtype]) for i in range(4)]
    index: dict = {}
    writer = FC._ShardWriter(tmp_path, 0, cspec, index)  # the cache's own writer and reader
    for i in range(4):
        writer.add(cond, i, SimpleNamespace(key=f"k{i}", index=i, caption=""))
    index["complete"] = True
    writer.flush(D.Position(1, 0), D.SkipCounter())
    source = FC.CachedSource(tmp_path)
    loaded = [FC.decode_cached(source.entry(i), None, 0, i + 1) for i in range(4)]
    assert all(isinstance(s.tensors[k], StoredTensor) for s in loaded for k in ("hidden", "scores"))
    assert torch.equal(loaded[2].tensors["latent"], records[2]["latent"])  # small tensors: plain tensors
    assert len(pickle.dumps(loaded[2])) < 2000  # what a DataLoader worker sends per sample

    from_refs = FC.collate(loaded, cspec)
    copied = FC.collate([FC.CachedSample(f"k{i}", i, 0, i + 1, "", (8, 8, 0, 0), dict(records[i]))
                         for i in range(4)], cspec)
    assert torch.equal(from_refs.features.hidden, copied.features.hidden)
    assert torch.equal(from_refs.features.scores, copied.features.scores)
    assert torch.equal(from_refs.features.mask, copied.features.mask)
    assert torch.equal(from_refs.latents, copied.latents)
    shard = tmp_path / "rank0-00000.safetensors"

    # read_into: contiguous and row-strided destinations, load(), bad destinations refused
    assert sorted(stored_tensors(shard, 2)) == sorted(records[2])  # from the header, parsed once
    ref = stored_tensors(shard, 2)["scores"]
    want = records[2]["scores"]
    assert torch.equal(ref.load(), want)
    wide = torch.full((want.shape[0], want.shape[1] + 4, want.shape[2]), 7, dtype=want.dtype)
    ref.read_into(wide[:, :want.shape[1]])
    assert torch.equal(wide[:, :want.shape[1]], want) and bool((wide[:, want.shape[1]:] == 7).all())
    with pytest.raises(ValueError):
        ref.read_into(torch.empty(want.shape, dtype=torch.float64))
    with pytest.raises(ValueError):
        ref.read_into(torch.empty(want.shape[0], want.shape[2], want.shape[1], dtype=want.dtype).transpose(1, 2))


def test_stored_tensor_reads_survive_short_reads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """preadv may return fewer bytes than asked: the rest is read, block boundaries or not."""
    import os

    import safetensors.torch

    from llmdiff_core.training import stored_tensor as ST

    if not ST.CAN_READ_INTO:
        pytest.skip("no os.preadv here")
    t = torch.arange(3 * 5 * 7, dtype=torch.float32).reshape(3, 5, 7)
    path = tmp_path / "x.safetensors"
    safetensors.torch.save_file({"0.x": t}, str(path))
    real = os.preadv
    monkeypatch.setattr(ST.os, "preadv", lambda fd, bufs, off: real(fd, [bufs[0][:13]], off))  # 13 bytes a call
    dst = torch.zeros(3, 9, 7)
    ST.stored_tensors(path, 0)["x"].read_into(dst[:, 2:7])
    assert torch.equal(dst[:, 2:7], t) and dst[:, :2].abs().sum() == 0 and dst[:, 7:].abs().sum() == 0


def test_a_truncated_cache_file_gets_a_clear_error(tmp_path: Path) -> None:
    import safetensors.torch

    from llmdiff_core.errors import LLMDiffError
    from llmdiff_core.training import stored_tensor as ST

    path = tmp_path / "rank0-00000.safetensors"
    safetensors.torch.save_file({"0.scores": torch.ones(4, 6, 8)}, str(path))
    ref = ST.stored_tensors(path, 0)["scores"]
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - 10)
    with pytest.raises(LLMDiffError, match="delete the cache folder"):
        ref.load()


def test_a_cache_file_changed_after_its_places_were_read_is_refused(tmp_path: Path) -> None:
    """Places (offsets) belong to one version of a shard: a replaced or rewritten file is never read with
    the old layout (an error, not wrong values); the new version's places read the new values."""
    import safetensors.torch

    from llmdiff_core.errors import LLMDiffError
    from llmdiff_core.training import stored_tensor as ST

    path = tmp_path / "rank0-00000.safetensors"
    safetensors.torch.save_file({"0.scores": torch.ones(2, 3)}, str(path))
    old = ST.stored_tensors(path, 0)["scores"]
    safetensors.torch.save_file({"0.mask": torch.zeros(5), "0.scores": torch.full((2, 3), 2.0)}, str(path))
    with pytest.raises(LLMDiffError, match="changed while training"):
        old.load()  # replaced
    assert sorted(ST.stored_tensors(path, 0)) == ["mask", "scores"]
    new = ST.stored_tensors(path, 0)["scores"]
    assert torch.equal(new.load(), torch.full((2, 3), 2.0))
    with open(path, "ab") as f:
        f.write(b"\0" * 8)
    with pytest.raises(LLMDiffError, match="changed while training"):
        new.load()  # rewritten in place, under an open descriptor


def test_a_batch_reads_its_stored_tensors_on_several_threads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """read_all overlaps the reads of a batch on a few threads (each its own descriptors): the same bytes
    as reading one after the other, and a damaged file's error still reaches the caller."""
    import threading

    import safetensors.torch

    from llmdiff_core.errors import LLMDiffError
    from llmdiff_core.training import stored_tensor as ST

    if not ST.CAN_READ_INTO:
        pytest.skip("no os.preadv here")
    monkeypatch.setattr(ST, "READ_THREADS", 3)
    monkeypatch.setattr(ST, "_pool", None)
    tensors = {f"{i}.scores": torch.randn(4, 5 + i, 8).to(torch.bfloat16) for i in range(12)}
    path = tmp_path / "rank0-00000.safetensors"
    safetensors.torch.save_file(tensors, str(path))
    threads: set[int] = set()
    real = ST._read_into

    def spy(*args: Any) -> bool:
        threads.add(threading.get_ident())
        threading.Event().wait(0.01)  # long enough that one thread cannot take every read
        return real(*args)
    monkeypatch.setattr(ST, "_read_into", spy)
    dst = torch.full((12, 4, 20, 8), 7.0, dtype=torch.bfloat16)
    plain = torch.ones(3)
    out = torch.zeros(3)
    ST.read_all([(ST.stored_tensors(path, i)["scores"], dst[i, :, :5 + i]) for i in range(12)] + [(plain, out)])
    for i in range(12):
        assert torch.equal(dst[i, :, :5 + i], tensors[f"{i}.scores"]) and bool((dst[i, :, 5 + i:] == 7).all())
    assert torch.equal(out, plain)
    assert len(threads) >= 2 and threading.get_ident() not in threads

    places = [ST.stored_tensors(path, i)["scores"] for i in range(12)]
    with open(path, "r+b") as f:  # the last tensors now run past the end of the file
        f.truncate(path.stat().st_size - 10)
    places = [ST.StoredTensor(p.path, p.offset, p.dtype, p.shape, ST._version(str(path))) for p in places]
    with pytest.raises(LLMDiffError, match="delete the cache folder"):
        ST.read_all([(p, torch.empty(p.shape, dtype=p.dtype)) for p in places])


def test_a_reading_thread_closes_its_descriptors_when_it_ends(tmp_path: Path) -> None:
    """Each thread reads through descriptors of its own; they must not outlive it (a training run's pool
    threads live as long as the process, but a replaced pool or a short-lived reader must not leak)."""
    import os
    import threading

    import safetensors.torch

    from llmdiff_core.training import stored_tensor as ST

    if not os.path.isdir("/proc/self/fd"):
        pytest.skip("needs /proc/self/fd to see what a descriptor refers to")
    path = tmp_path / "rank0-00000.safetensors"
    safetensors.torch.save_file({"0.x": torch.ones(3)}, str(path))
    place = ST.stored_tensors(path, 0)["x"]
    opened: list[list[int]] = []

    def read() -> None:
        assert torch.equal(place.load(), torch.ones(3))
        opened.append(list(ST._fds.open.values()))

    def open_on_our_file(fd: int) -> bool:  # (other code may reuse the number for another file)
        try:
            return os.readlink(f"/proc/self/fd/{fd}") == str(path)
        except OSError:
            return False
    threads = [threading.Thread(target=read) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [len(fds) for fds in opened] == [1] * 8  # one descriptor per thread, none shared
    assert not [fd for fds in opened for fd in fds if open_on_our_file(fd)]
