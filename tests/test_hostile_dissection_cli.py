"""Hostile use of the long computations, dissection files, fixations and the command line
(issue 15): cancellation and progress of ``cw.visualize`` / ``cw.invert`` / ``cw.dissect``,
damaged result files, masks naming unknown concepts, ``Model(output=...)`` in CNN Fixations,
and the CLI's errors. Every error case checks the exception's type and that its message says
what to do."""
from __future__ import annotations

import json
import threading

import numpy as np
import pytest
import torch
from conftest import snapshot, assert_same_state
from torch import nn

import cnnwidgets as cw
from cnnwidgets.cli import main
from cnnwidgets.engine.dissection import DissectionFileError
from cnnwidgets.engine.fixations import UnsupportedOperationError
from cnnwidgets.engine.hooks import hook_count

# --------------------------------------------------------------------------- helpers


def small_net():
    """A small random CNN with two dissectable layers (used by the CLI as a model factory)."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(),
        nn.Conv2d(4, 6, 3, stride=2, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3),
    )
    return cw.Model(net, input_size=(16, 16), labels=["ant", "bee", "cow"], crop=1.0)


def odd_state_model():
    """small_net in training mode with one parameter frozen: what must survive a cancel."""
    model = small_net()
    model.module.train()
    model.module[0].bias.requires_grad_(False)
    return model


def image16():
    rng = np.random.default_rng(0)
    return (rng.uniform(0.1, 0.9, (16, 16, 3)) * 255).round().astype(np.uint8)


def set_on_first_call(event, calls):
    """A progress callback that records its calls and sets ``event`` at the first."""

    def progress(done, total):
        calls.append((done, total))
        event.set()

    return progress


RUNS = {
    "visualize": lambda m, **kw: cw.visualize(m, "2:1", steps=5, size=16, **kw),
    "invert": lambda m, **kw: cw.invert(m, image16(), "2", steps=5, **kw),
    "dissect": lambda m, **kw: cw.dissect(m, cw.datasets.SyntheticConcepts(6, 16), ["1", "3"],
                                          batch_size=2, **kw),
}


# --------------------------------------------------------------------------- cancel / progress


@pytest.mark.parametrize("name", sorted(RUNS))
def test_event_set_from_progress_stops_the_run(name):
    model = odd_state_model()
    before = snapshot(model.module)
    stop, calls = threading.Event(), []
    with pytest.raises(cw.Cancelled, match=name):
        RUNS[name](model, cancel=stop, progress=set_on_first_call(stop, calls))
    # stopped at the first check after the event was set: one unit of work reported, no more
    assert len(calls) == 1
    assert_same_state(model.module, before)
    assert hook_count(model.module) == 0
    assert all(p.grad is None for p in model.module.parameters())


@pytest.mark.parametrize("name", sorted(RUNS))
def test_callable_cancel_stops_before_any_work(name):
    model, calls = small_net(), []
    with pytest.raises(cw.Cancelled):
        RUNS[name](model, cancel=lambda: True, progress=lambda d, t: calls.append(d))
    assert calls == []
    assert hook_count(model.module) == 0


def test_progress_callable_gets_done_and_total():
    calls = []
    cw.visualize(small_net(), "2:1", steps=3, size=16, progress=lambda d, t: calls.append((d, t)))
    assert calls == [(1, 3), (2, 3), (3, 3)]
    calls = []
    cw.invert(small_net(), image16(), "2", steps=2, progress=lambda d, t: calls.append((d, t)))
    assert calls == [(1, 2), (2, 2)]
    # dissect counts images over its two passes: 5 images in batches of 2 → 2, 2, 1 per pass
    calls = []
    cw.dissect(small_net(), cw.datasets.SyntheticConcepts(5, 16), "1", batch_size=2,
               progress=lambda d, t: calls.append((d, t)))
    assert calls == [(2, 10), (4, 10), (5, 10), (7, 10), (9, 10), (10, 10)]


def test_dissect_cancel_deletes_its_scratch_file(tmp_path):
    stop, calls = threading.Event(), []
    with pytest.raises(cw.Cancelled):
        cw.dissect(small_net(), cw.datasets.SyntheticConcepts(6, 16), "1", batch_size=2,
                   cache_dir=tmp_path, cancel=stop, progress=set_on_first_call(stop, calls))
    assert list(tmp_path.iterdir()) == []  # no scratch folder, no cached result


@pytest.mark.parametrize("name", sorted(RUNS))
def test_wrong_cancel_and_progress_values_say_what_they_accept(name):
    with pytest.raises(TypeError, match="threading.Event"):
        RUNS[name](small_net(), cancel=True)
    with pytest.raises(TypeError, match=r"True, False or a callable"):
        RUNS[name](small_net(), progress="yes")


# --------------------------------------------------------------------------- result files


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A small dissection result, saved; returns (result, path)."""
    result = cw.dissect(small_net(), cw.datasets.SyntheticConcepts(6, 16), ["1", "3"],
                        progress=False)
    path = result.save(tmp_path_factory.mktemp("saved") / "r.npz")
    return result, path


def _rewrite(src, dst, change):
    """Copy the npz at ``src`` to ``dst`` with ``change(dict of arrays)`` applied."""
    with np.load(src) as z:
        arrays = {k: z[k] for k in z.files}
    change(arrays)
    np.savez(dst, **arrays)


def _meta(arrays, **edits):
    meta = json.loads(arrays["meta"].tobytes().decode())
    meta.update(edits)
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)


BAD_FILES = {
    # name: (how to make it from a good file's path and bytes, what the message says)
    "empty": (lambda src, dst: dst.write_bytes(b""), "empty"),
    "text": (lambda src, dst: dst.write_text("layer,unit,concept\n1,0,red\n"), "not an .npz"),
    "truncated": (lambda src, dst: dst.write_bytes(src.read_bytes()[: src.stat().st_size // 2]),
                  "truncated"),
    "npy array": (lambda src, dst: np.save(open(dst, "wb"), np.zeros(3)), "not an .npz"),
    "foreign npz": (lambda src, dst: np.savez(dst, weights=np.zeros(3)), "no 'meta' entry"),
    "pickled object": (lambda src, dst: _rewrite(src, dst, lambda a: a.__setitem__(
        "0/iou", np.array([{"x": 1}], dtype=object))), "pickled"),
    "meta not json": (lambda src, dst: _rewrite(src, dst, lambda a: a.__setitem__(
        "meta", np.frombuffer(b"\xff{not json", np.uint8))), "not valid json"),
    "newer format": (lambda src, dst: _rewrite(src, dst, lambda a: _meta(a, format=2)),
                     "newer cnnwidgets"),
    "meta key missing": (lambda src, dst: _rewrite(src, dst, lambda a: _meta(a, concepts=None)),
                         "'concepts'"),
    "array missing": (lambda src, dst: _rewrite(src, dst, lambda a: a.pop("1/top_maps")),
                      "missing"),
    "wrong shape": (lambda src, dst: _rewrite(src, dst, lambda a: a.__setitem__(
        "1/iou", a["1/iou"].T.copy())), "'iou' has shape"),
    "fewer concepts": (lambda src, dst: _rewrite(src, dst, lambda a: _meta(
        a, concepts=json.loads(a["meta"].tobytes())["concepts"][:-1])), "has shape"),
    "float counts": (lambda src, dst: _rewrite(src, dst, lambda a: a.__setitem__(
        "0/inter", a["0/inter"].astype(np.float32))), "not integers"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_damaged_result_file_is_one_clear_error(case, saved, tmp_path):
    _, good = saved
    make, says = BAD_FILES[case]
    bad = tmp_path / "bad.npz"
    make(good, bad)
    with pytest.raises(DissectionFileError) as info:
        cw.DissectionResult.load(bad)
    message = str(info.value)
    assert isinstance(info.value, ValueError)
    assert str(bad) in message and says in message
    assert "cw.dissect" in message and "result.save" in message  # how to get a good file
    assert "allow_pickle" not in message


def test_load_of_a_missing_file_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="no dissection result at .*nothing"):
        cw.DissectionResult.load(tmp_path / "nothing")


def test_save_into_an_existing_folder_writes_inside_it(saved, tmp_path):
    result, _ = saved
    folder = tmp_path / "results"
    folder.mkdir()
    path = result.save(folder)
    assert path == folder / "dissection.npz" and path.is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results"]  # nothing beside it
    assert cw.DissectionResult.load(folder).equals(result)


# --------------------------------------------------------------------------- unknown concepts


class NamedMasks(cw.datasets.SyntheticConcepts):
    """SyntheticConcepts whose item 1 names its masks by concept name, one of them misspelt."""

    def __getitem__(self, i):
        item = super().__getitem__(i)
        if i == 1:
            item["masks"] = {"red": item["masks"][0] == 8, "reddish": item["masks"][0] == 1}
        return item


def test_mask_naming_an_unknown_concept_lists_the_known_ones():
    ds = NamedMasks(4, 16)
    with pytest.raises(ValueError, match="reddish") as info:
        cw.dissect(small_net(), ds, "1", progress=False, batch_size=2)
    message = str(info.value)
    assert "did you mean 'red'" in message
    assert all(c in message for c in ds.concepts)  # every known concept listed


# --------------------------------------------------------------------------- fixations


class TwoHeads(nn.Module):
    """An identity 1×1 convolution (each point stays where it is), then the flattened 3×2×2
    map of an 8×8 input (index c·64 + h·8 + w) into two linear heads of 2 classes:
    ``logits`` class 0 reads only index 65 = (c 1, row 0, col 1), ``aux`` class 0 only index
    0 = (c 0, row 0, col 0); class 1 of both reads nothing. On a grey image class 0 wins in
    both, and the linear-on-a-flattened-map rule keeps the single largest contribution:
    the fixation is at pixel (0, 1) through ``logits``, (0, 0) through ``aux``."""

    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.conv = nn.Conv2d(3, 3, 1, bias=False)
        self.logits = nn.Linear(192, 2, bias=False)
        self.aux = nn.Linear(192, 2, bias=False)
        with torch.no_grad():
            self.conv.weight.copy_(torch.eye(3)[:, :, None, None])
            self.logits.weight.zero_()
            self.aux.weight.zero_()
            self.logits.weight[0, 65] = 1.0
            self.aux.weight[0, 0] = 1.0

    def forward(self, x):
        f = torch.flatten(self.conv(x), 1)
        if self.kind == "dict":
            return {"aux": self.aux(f), "logits": self.logits(f)}
        return self.aux(f), self.logits(f)


def two_heads(kind, output):
    return cw.Model(TwoHeads(kind), input_size=(8, 8), mean=(0, 0, 0), std=(1, 1, 1), crop=1.0,
                    labels=["a", "b"], output=output)


GREY = np.full((8, 8, 3), 128, np.uint8)


@pytest.mark.parametrize("kind, output", [("dict", lambda out: out["logits"]),
                                          ("tuple", lambda out: out[1])])
def test_fixations_follow_the_models_output(kind, output):
    model = two_heads(kind, output)
    f = cw.fixations(model, GREY)
    assert f.target == 0 and f.all_points.tolist() == [[0, 1]]
    assert list(f.trace) == ["logits", "conv", "input"]
    assert f.trace["conv"].tolist() == [[1, 0, 1]]
    a = cw.attribute(model, GREY, "fixations")
    expected = np.zeros((8, 8), np.float32)
    expected[0, 1] = 1.0
    np.testing.assert_array_equal(a.raw, expected)
    assert hook_count(model.module) == 0


def test_fixations_refuse_an_output_that_computes_new_scores():
    model = two_heads("tuple", lambda out: out[1] * 2.0)
    with pytest.raises(UnsupportedOperationError, match=r"output=lambda out: out\['logits'\]"):
        cw.fixations(model, GREY)


# --------------------------------------------------------------------------- the command line

FACTORY = "test_hostile_dissection_cli:small_net"


def _cli(tmp_path, *extra, out=None):
    return ["dissect", "--model", FACTORY, "--layers", "1", "--synthetic", "4", "--size", "16",
            "--out", str(out or tmp_path / "r.npz"), "--quiet", *extra]


def test_cli_error_is_one_short_message_and_a_failing_status(tmp_path, capsys):
    status = main(_cli(tmp_path, "--layers", "conv9", out=f"{tmp_path / 'made'}/"))
    err = capsys.readouterr().err
    assert status == 1
    assert list(tmp_path.iterdir()) == []  # a failed run leaves nothing behind
    assert "Traceback" not in err and len(err.strip().splitlines()) <= 3
    assert "conv9" in err and "--debug" in err
    with pytest.raises(cw.LayerNotFoundError):  # --debug: the exception itself
        main(["--debug", *_cli(tmp_path, "--layers", "conv9")])
    with pytest.raises(cw.LayerNotFoundError):  # after the command, too
        main([*_cli(tmp_path, "--layers", "conv9"), "--debug"])


@pytest.mark.parametrize("option, value, says", [
    ("--batch-size", "0", "at least 1"), ("--batch-size", "-3", "at least 1"),
    ("--synthetic", "0", "at least 1"), ("--size", "4", "at least 16"),
    ("--workers", "-1", "at least 0"), ("--quantile", "0", "(0, 1)"),
    ("--quantile", "1", "(0, 1)"), ("--quantile", "nan", "(0, 1)"),
    ("--iou-threshold", "1.5", "[0, 1]"), ("--batch-size", "two", "whole number"),
    ("--device", "gpu", "cpu, cuda"), ("--device", "cuda:99", "cuda"),
    ("--broden", "/no/such/folder", "not a folder"),
])
def test_cli_refuses_out_of_range_numbers(tmp_path, capsys, option, value, says):
    args = _cli(tmp_path)
    if option == "--broden":
        args.remove("--synthetic")
        args.remove("4")
    with pytest.raises(SystemExit) as info:
        main([*args, option, value])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {option}" in err and says in err
    assert not (tmp_path / "r.npz").exists()


def test_cli_out_naming_a_folder_writes_inside_it(tmp_path, capsys):
    folder = tmp_path / "results"
    folder.mkdir()
    assert main(_cli(tmp_path, out=folder)) == 0
    assert (folder / "dissection.npz").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results"]  # nothing beside it
    assert str(folder / "dissection.npz") in capsys.readouterr().out
    # a path ending in a separator is a folder too, made when missing
    assert main(_cli(tmp_path, out=f"{tmp_path / 'new'}/")) == 0
    assert (tmp_path / "new" / "dissection.npz").is_file()


def test_cli_out_under_a_file_fails_before_running(tmp_path, capsys):
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    status = main(_cli(tmp_path, "--model", "no_such_module_anywhere:f",
                       out=blocker / "r.npz"))  # the model is never loaded: --out fails first
    err = capsys.readouterr().err
    assert status == 1 and "is a file, not a folder" in err and "Traceback" not in err


def test_cli_model_factory_that_cannot_be_imported(tmp_path, capsys):
    status = main(_cli(tmp_path, "--model", "no_such_module_anywhere:f"))
    err = capsys.readouterr().err
    assert status == 1 and "cannot import 'no_such_module_anywhere'" in err
    assert "PYTHONPATH" in err and "Traceback" not in err
