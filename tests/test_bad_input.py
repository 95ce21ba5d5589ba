"""Untrusted models and bad input (issue 12): a one-line error and exit 2, never a traceback, never a
lost file. Each case runs the CLI on a tiny hand-built export and checks the exit status, the message,
that the input and everything beside it are byte-for-byte unchanged, and that no temporary folder is
left."""

import json
import os
import shutil
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from slim_onnx import cli, pipeline
from helpers import english

HIDDEN, FFN = 32, 64
NO_CALIBRATION = ["--rank", "0", "--pruning", "magnitude", "--quantizer", "absmax", "-q"]
ERROR = "slim-onnx: error: "



def write_tokenizer(folder: Path) -> int:
    """A small byte-level BPE saved as a Hugging Face tokenizer; returns its vocabulary size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator([english(0, 20_000)], trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>"]))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, unk_token="<unk>")
    tokenizer.save_pretrained(folder)
    return len(tokenizer)


def write_model(path: Path, vocab: int) -> None:
    """input_ids -> embedding Gather -> up MatMul -> Relu -> down MatMul -> lm_head MatMul -> logits,
    with the inputs an Optimum decoder export without cache declares."""
    rng = np.random.default_rng(0)
    weights = {"embed.weight": (vocab, HIDDEN), "up.weight": (HIDDEN, FFN), "down.weight": (FFN, HIDDEN),
               "lm_head.weight": (HIDDEN, vocab)}
    nodes = [
        helper.make_node("Gather", ["embed.weight", "input_ids"], ["x"], name="/model/embed_tokens/Gather"),
        helper.make_node("MatMul", ["x", "up.weight"], ["up"], name="/model/layers.0/mlp/up_proj/MatMul"),
        helper.make_node("Relu", ["up"], ["act"], name="/model/layers.0/mlp/Relu"),
        helper.make_node("MatMul", ["act", "down.weight"], ["down"], name="/model/layers.0/mlp/down_proj/MatMul"),
        helper.make_node("MatMul", ["down", "lm_head.weight"], ["logits"], name="/lm_head/MatMul"),
    ]
    tokens = ["batch_size", "sequence_length"]
    graph = helper.make_graph(
        nodes, "tiny",
        [helper.make_tensor_value_info(name, TensorProto.INT64, tokens) for name in ("input_ids", "attention_mask")],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [*tokens, vocab])],
        [numpy_helper.from_array((rng.standard_normal(shape) / np.sqrt(shape[0])).astype(np.float32), name)
         for name, shape in weights.items()],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10), str(path))


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tiny_export")
    write_model(root / "model.onnx", write_tokenizer(root))
    (root / "config.json").write_text('{"model_type": "tiny"}')
    return root


@pytest.fixture
def project(tmp_path, export) -> Path:
    """tmp/proj/in: a copy of the export, with the user's other files beside it and a calibration text."""
    proj = tmp_path / "proj"
    shutil.copytree(export, proj / "in")
    (proj / "notes.txt").write_text("the user's own file")
    (proj / "calib.txt").write_text(english(0, 30_000))
    return proj


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.rglob("*") if ".tmp-" in p.name or "probe" in p.name]


def run(capsys, *args) -> tuple[int, str]:
    code = cli.main([str(a) for a in args])
    return code, capsys.readouterr().err


def assert_refused(code: int, err: str, message: str) -> None:
    """Exit 2 and one line, naming the problem."""
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith(ERROR), err
    assert message in err, err


def compress_fast(capsys, src, out, *extra) -> None:
    code, err = run(capsys, "compress", src, out, *NO_CALIBRATION, *extra)
    assert code == 0, err


# -- lost data -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "src,out,message",
    [
        ("in", "in", "is the input folder"),
        ("in", ".", "holds the input"),  # `slim-onnx compress proj/in proj --overwrite`
        ("in", "in/slim", "is inside the input folder"),
        ("in/model.onnx", "in", "is the folder of the input"),  # a model file: its folder counts
        ("in/model.onnx", ".", "holds the input"),
        ("in/model.onnx", "in/model.onnx", "is not a folder: --overwrite replaces only"),
        ("in", "link_to_in", "is the input folder"),  # symbolic links are followed
        ("link_to_in/model.onnx", "in", "is the folder of the input"),
        ("in", "link_to_in/slim", "is inside the input folder"),
    ],
)
def test_an_output_that_is_holds_or_lies_in_the_input_is_refused(capsys, project, src, out, message):
    (project / "link_to_in").symlink_to(project / "in")
    before = snapshot(project)
    # Every output lies inside the test's own folder: were the check to regress, --overwrite must not
    # be able to delete anything outside it (an output of "/" once did, on a machine running old code).
    src, out = project / src, project / out
    code, err = run(capsys, "compress", src, out, "--calib", project / "calib.txt", "--overwrite")
    assert_refused(code, err, message)
    assert snapshot(project) == before and not leftovers(project)


def test_the_current_folder_is_refused_when_it_holds_the_input(capsys, project, monkeypatch):
    """`cd proj && slim-onnx compress in . --overwrite` deleted the current folder."""
    monkeypatch.chdir(project)
    before = snapshot(project)
    code, err = run(capsys, "compress", "in", ".", "--overwrite", *NO_CALIBRATION)
    assert_refused(code, err, "holds the input")
    assert snapshot(project) == before and not leftovers(project)


def test_an_output_folder_beside_an_input_model_file_is_fine(capsys, project):
    before = snapshot(project / "in")
    compress_fast(capsys, project / "in" / "model.onnx", project / "in" / "slim")
    after = snapshot(project / "in")
    assert {name: data for name, data in after.items() if not name.startswith("slim/")} == before
    assert "slim/slim_report.json" in after and not leftovers(project)


@pytest.mark.parametrize(
    "existing,message",
    [
        ("folder", "is not an earlier slim-onnx output (it has no slim_report.json)"),
        ("empty_folder", "is not an earlier slim-onnx output"),
        ("file", "is not a folder: --overwrite replaces only an earlier slim-onnx output folder"),
    ],
)
def test_overwrite_refuses_what_slim_onnx_did_not_write(capsys, project, existing, message):
    out = project / "out"
    if existing == "file":
        out.write_text("a file of the user's")
    else:
        out.mkdir()
        if existing == "folder":
            (out / "thesis.tex").write_text("years of work")
    before = snapshot(project)
    code, err = run(capsys, "compress", project / "in", out, "--overwrite", *NO_CALIBRATION)
    assert_refused(code, err, message)
    assert snapshot(project) == before and out.exists() and not leftovers(project)


def test_overwrite_replaces_an_earlier_output(capsys, project):
    out = project / "out"
    compress_fast(capsys, project / "in", out)
    (out / "stale.txt").write_text("from the earlier run")
    inputs = snapshot(project / "in")
    compress_fast(capsys, project / "in", out, "--overwrite", "--no-lm-head")
    assert not (out / "stale.txt").exists()
    report = json.loads((out / "slim_report.json").read_text())
    assert report["kept_dense"] == ["/lm_head/MatMul"]
    assert snapshot(project / "in") == inputs and not leftovers(project)
    assert sorted(p.name for p in project.iterdir()) == ["calib.txt", "in", "notes.txt", "out"]


def test_calibration_text_inside_the_output_is_refused(capsys, project):
    """--overwrite replaces the output folder: calibration text (or a tokenizer) kept there would go
    with it."""
    out = project / "out"
    compress_fast(capsys, project / "in", out)
    (out / "calib.txt").write_text((project / "calib.txt").read_text())
    before = snapshot(out)
    code, err = run(capsys, "compress", project / "in", out, "--calib", out / "calib.txt", "--overwrite")
    assert_refused(code, err, f"the calibration text {out / 'calib.txt'} lies in the output folder {out}")
    assert snapshot(out) == before and not leftovers(project)


def test_a_failed_swap_keeps_the_earlier_output(capsys, project, monkeypatch):
    """If the new folder cannot be renamed in, the earlier output is renamed back: the user never
    ends up with neither."""
    out = project / "out"
    compress_fast(capsys, project / "in", out)
    before = snapshot(out)
    rename = Path.rename

    def refuse_the_new_folder(self, target):
        if ".tmp-" in self.name and not self.name.endswith(".old"):
            raise OSError(28, "No space left on device", str(target))
        return rename(self, target)

    monkeypatch.setattr(Path, "rename", refuse_the_new_folder)
    code, err = run(capsys, "compress", project / "in", out, "--overwrite", *NO_CALIBRATION)
    assert code == 1 and err.startswith(ERROR) and "No space left on device" in err, err
    assert snapshot(out) == before and not leftovers(project)


# -- numbers, patterns and the output's place -----------------------------------------------------


@pytest.mark.parametrize(
    "options,message",
    [
        (["--seqlen", "0"], "--seqlen 0: expected at least 1 token per window"),
        (["--seqlen", "-3"], "--seqlen -3: expected at least 1 token per window"),
        (["--calib-samples", "0"], "--calib-samples 0: expected at least 1 token window"),
        (["--calib-samples", "-1"], "--calib-samples -1: expected at least 1 token window"),
        (["--group-size", "7"], "group_size=7: expected a multiple of 8 (such as 32, 64 or 128)"),
        (["--group-size", "0"], "group_size=0: expected a multiple of 8"),
        (["--rank", "2.5"], "rank=2.5: a ratio must be < 1, an absolute rank an integer"),
        (["--include", "("], "--include '(' is not a valid regular expression: missing ), unterminated subpattern"),
        (["--exclude", "[a-"], "--exclude '[a-' is not a valid regular expression: unterminated character set"),
    ],
)
def test_bad_options_are_refused_before_any_work(capsys, project, monkeypatch, options, message):
    monkeypatch.setattr(pipeline, "collect_statistics", None)  # calibrating would be a TypeError
    before = snapshot(project)
    code, err = run(capsys, "compress", project / "in", project / "out", "--calib", project / "calib.txt", *options)
    assert_refused(code, err, message)
    assert snapshot(project) == before and not leftovers(project)


def test_the_adapter_group_size_is_checked_like_the_group_size():
    from slim_onnx.config import ConfigError, SlimConfig

    with pytest.raises(ConfigError, match="adapter_group_size=12: expected a multiple of 8"):
        SlimConfig(adapter_group_size=12)


@pytest.mark.parametrize("options,message", [(["--seqlen", "1"], "--seqlen 1: expected at least 2 tokens per window"),
                                             (["--windows", "0"], "--windows 0: expected at least 1 window")])
def test_bad_eval_numbers_are_refused(capsys, project, options, message):
    code, err = run(capsys, "eval", project / "in", "--text", project / "calib.txt", *options)
    assert_refused(code, err, message)


def unwritable_folder(tmp_path: Path) -> Path:
    """A folder no file can be created in; as root, chmod does not stop writes, so /proc instead."""
    if os.geteuid() != 0:
        folder = tmp_path / "read_only"
        folder.mkdir()
        folder.chmod(0o555)
        return folder
    if not Path("/proc/self").is_dir():
        pytest.skip("running as root without /proc: no folder to make unwritable")
    return Path("/proc")


def test_an_output_that_cannot_be_written_is_refused_before_any_work(capsys, project, tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline, "load_model", None)  # loading the model would be a TypeError
    folder = unwritable_folder(tmp_path)
    code, err = run(capsys, "compress", project / "in", folder / "out", *NO_CALIBRATION)
    assert_refused(code, err, f"cannot write in {folder} (")
    assert "choose an output folder where you can write" in err
    assert not (folder / "out").exists() and not leftovers(tmp_path)


def test_an_output_below_a_file_is_refused(capsys, project):
    code, err = run(capsys, "compress", project / "in", project / "notes.txt" / "out", *NO_CALIBRATION)
    assert_refused(code, err, f"cannot create {project / 'notes.txt' / 'out'}: {project / 'notes.txt'} is not a folder")


# -- calibration data -----------------------------------------------------------------------------


def valid_npz_arrays(batches: int = 2, seq: int = 16) -> dict[str, np.ndarray]:
    ids = np.random.default_rng(0).integers(0, 200, size=(batches, 1, seq))
    return {"input_ids": ids, "attention_mask": np.ones_like(ids)}


def test_a_valid_npz_calibrates(capsys, project):
    np.savez(project / "calib.npz", **valid_npz_arrays())
    code, err = run(capsys, "compress", project / "in", project / "out", "--calib", project / "calib.npz", "-q")
    assert code == 0, err
    report = json.loads((project / "out" / "slim_report.json").read_text())
    assert all(layer["output_error"] >= 0 for layer in report["layers"])


def bad_npz(path: Path, case: str) -> None:
    arrays = valid_npz_arrays()
    if case == "not_a_zip":
        path.write_bytes(b"input_ids,attention_mask\n1,1\n")
    elif case == "truncated":
        np.savez(path, **arrays)
        path.write_bytes(path.read_bytes()[:200])
    elif case == "npy":
        with path.open("wb") as f:
            np.save(f, arrays["input_ids"])
    elif case == "pickled":
        np.savez(path, input_ids=np.array([{"a": 1}], dtype=object))
    elif case == "empty_zip":
        zipfile.ZipFile(path, "w").close()
    else:
        if case == "unknown_name":
            arrays["ids"] = arrays.pop("input_ids")
        elif case == "missing_input":
            del arrays["attention_mask"]
        elif case == "no_batch_axis":
            arrays = {name: a[:, 0] for name, a in arrays.items()}
        elif case == "wrong_dtype":
            arrays["input_ids"] = arrays["input_ids"].astype(np.int32)
        elif case == "batch_counts":
            arrays["attention_mask"] = arrays["attention_mask"][:1]
        elif case == "zero_batches":
            arrays = {name: a[:0] for name, a in arrays.items()}
        elif case == "token_out_of_range":  # the right shape and type: only running the model finds it
            arrays["input_ids"][1, 0, 3] = 10**6
        np.savez(path, **arrays)


@pytest.mark.parametrize(
    "case,message",
    [
        ("missing", "calibration data {npz} does not exist"),
        ("not_a_zip", "{npz} is not a readable .npz (ValueError: "),
        ("truncated", "{npz} is not a readable .npz (BadZipFile: "),
        ("npy", "{npz} holds one array (.npy), not an .npz archive"),
        ("pickled", "{npz} is not a readable .npz (ValueError: Object arrays cannot be loaded when allow_pickle"),
        ("empty_zip", ("{npz} holds no array: expected one array per model input, named as the input, with a "
                       "leading axis that indexes the batches")),
        ("unknown_name", "{npz}: array 'ids' is not an input of the model (its inputs: input_ids, attention_mask)"),
        ("missing_input", "{npz} has no array for model input 'attention_mask'"),
        ("no_batch_axis", ("{npz}: array 'input_ids' has shape [2, 16], but input 'input_ids' is "
                           "[batch_size, sequence_length]: expected [batches, batch_size, sequence_length]")),
        ("wrong_dtype", ("{npz}: array 'input_ids' is int32, but input 'input_ids' is int64: convert it with "
                         ".astype(np.int64)")),
        ("batch_counts", ("{npz}: every array needs the same number of batches (leading axis), got "
                          "input_ids: 2, attention_mask: 1")),
        ("zero_batches", "{npz} holds no batch"),
        ("token_out_of_range", "onnxruntime could not run the calibration batch at index 1: "),
    ],
)
def test_bad_npz_is_refused_with_the_array_and_the_input(capsys, project, case, message):
    npz = project / "calib.npz"
    if case != "missing":
        bad_npz(npz, case)
    before = snapshot(project)
    code, err = run(capsys, "compress", project / "in", project / "out", "--calib", npz, "-q")
    assert_refused(code, err, message.format(npz=npz))
    assert snapshot(project) == before and not (project / "out").exists() and not leftovers(project)


def test_text_with_some_non_utf8_bytes_warns_with_its_share(capsys, project):
    calib = project / "calib.txt"
    text = english(0, 30_000).encode("ascii", errors="ignore")
    calib.write_bytes(b"".join(text[i : i + 19] + b"\xff" for i in range(0, len(text), 19)))  # 1 byte in 20
    code, err = run(capsys, "compress", project / "in", project / "out", "--calib", calib, "--calib-samples", 4,
                    "--seqlen", 16, "-v")
    assert code == 0, err
    assert err.count("warning: ") == 1 and f"warning: {calib}: 5.0% of its characters are not UTF-8 text\n" in err, err


@pytest.mark.parametrize("content", [bytes(range(256)) * 64, bytes(4096)], ids=["random_bytes", "zeros"])
def test_a_binary_calibration_file_is_refused(capsys, project, content):
    calib = project / "weights.bin"
    calib.write_bytes(content)
    code, err = run(capsys, "compress", project / "in", project / "out", "--calib", calib)
    assert_refused(code, err, f"{calib}: ")
    assert "of its characters are not UTF-8 text: is it a binary file? Pass a text file (or a folder of .txt " \
           "files), or an .npz of model inputs" in err


# -- rank -----------------------------------------------------------------------------------------


def test_a_rank_above_a_layers_size_is_announced_once(capsys, project):
    options = ["--rank", "64", "--lowrank", "naive", "--pruning", "magnitude", "--quantizer", "absmax", "-v"]
    code, err = run(capsys, "compress", project / "in", project / "out", *options)
    assert code == 0, err
    warning = "warning: rank 64 > min(K, N) = 32 for /model/layers.0/mlp/up_proj/MatMul and 2 more layers: using 32"
    assert err.count("warning: rank") == 1 and warning in err, err
    report = json.loads((project / "out" / "slim_report.json").read_text())
    assert [layer["method"]["rank"] for layer in report["layers"]] == [32, 32, 32]

    code, err = run(capsys, "compress", project / "in", project / "quiet", *options[:-1], "-q")
    assert code == 0 and err == ""


# -- models that cannot be read -------------------------------------------------------------------


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def test_eval_of_a_truncated_model(capsys, project):
    truncate(project / "in" / "model.onnx")
    code, err = run(capsys, "eval", project / "in", "--text", project / "calib.txt", "--seqlen", 16)
    assert_refused(code, err, f"{project / 'in' / 'model.onnx'} is not a readable ONNX model")


def test_eval_against_a_truncated_reference(capsys, project, tmp_path):
    reference = tmp_path / "reference"
    shutil.copytree(project / "in", reference)
    truncate(reference / "model.onnx")
    code, err = run(capsys, "eval", project / "in", "--text", project / "calib.txt", "--reference", reference,
                    "--seqlen", 16, "--windows", 2, "-q")
    assert_refused(code, err, f"onnxruntime cannot load {reference / 'model.onnx'} (")
    assert "is it damaged or incomplete?" in err


@pytest.fixture(scope="module")
def compressed_model(export, tmp_path_factory) -> onnx.ModelProto:
    out = tmp_path_factory.mktemp("compressed") / "slim"
    assert cli.main(["compress", str(export), str(out), *NO_CALIBRATION]) == 0
    return onnx.load(str(out / "model.onnx"))


def without_attribute(model: onnx.ModelProto, name: str, path: Path) -> str:
    """Save a copy of the model with `name` removed from its first SlimMatMul node; that node's name."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    node = next(n for n in model.graph.node if n.op_type == "SlimMatMul")
    node.attribute.remove(next(a for a in node.attribute if a.name == name))
    onnx.save(model, str(path))
    return node.name


@pytest.mark.parametrize("attribute", ["group_size", "K"])
def test_inspect_names_a_missing_required_attribute(capsys, compressed_model, tmp_path, attribute):
    node = without_attribute(compressed_model, attribute, tmp_path / "model.onnx")
    code, err = run(capsys, "inspect", tmp_path / "model.onnx")
    assert_refused(code, err, f"SlimMatMul node {node!r} has no attribute {attribute!r}: the model is damaged")


def test_inspect_takes_the_kernels_default_for_an_optional_attribute(capsys, compressed_model, tmp_path):
    """Without 'sparse' the kernel multiplies 2:4 weights (its default), so inspect shows that."""
    node = without_attribute(compressed_model, "sparse", tmp_path / "model.onnx")
    code = cli.main(["inspect", str(tmp_path / "model.onnx"), "--json"])
    rows = {row["layer"]: row for row in json.loads(capsys.readouterr().out)["layers"]}
    assert code == 0 and rows[node]["format"].startswith("2:4 int4")


def test_inspect_refuses_an_attribute_of_the_wrong_type(capsys, compressed_model, tmp_path):
    model = onnx.ModelProto.FromString(compressed_model.SerializeToString())
    node = next(n for n in model.graph.node if n.op_type == "SlimMatMul")
    node.attribute.remove(next(a for a in node.attribute if a.name == "rank"))
    node.attribute.append(helper.make_attribute("rank", "8"))
    onnx.save(model, str(tmp_path / "model.onnx"))
    code, err = run(capsys, "inspect", tmp_path / "model.onnx")
    assert_refused(code, err, f"SlimMatMul node {node.name!r}: attribute 'rank' must be an int, got '8'")


# -- Ctrl-C ---------------------------------------------------------------------------------------


def interrupt(*args, **kwargs):
    raise KeyboardInterrupt


@pytest.mark.parametrize("stage", ["load_model", "compress_layer", "save", "swap"])
def test_ctrl_c_leaves_nothing_behind(capsys, project, monkeypatch, stage):
    """Interrupted anywhere, compress exits 130 with one line; the input, an earlier output and
    everything beside them are as they were, and no temporary folder is left."""
    out = project / "out"
    compress_fast(capsys, project / "in", out)
    before = snapshot(project)
    if stage == "save":  # the temporary folder holds part of the output
        monkeypatch.setattr(pipeline.ir, "save", interrupt)
    elif stage == "swap":  # the earlier output is renamed aside, the new one not yet in
        rename = Path.rename
        monkeypatch.setattr(Path, "rename", lambda self, target: interrupt() if ".tmp-" in self.name and not
                            self.name.endswith(".old") else rename(self, target))
    else:
        monkeypatch.setattr(pipeline, stage, interrupt)
    code, err = run(capsys, "compress", project / "in", out, "--overwrite", *NO_CALIBRATION)
    assert (code, err) == (130, "slim-onnx: interrupted\n")
    assert snapshot(project) == before and not leftovers(project)


def test_ctrl_c_removes_the_folders_made_for_the_output(capsys, project, monkeypatch):
    monkeypatch.setattr(pipeline.ir, "save", interrupt)
    code, err = run(capsys, "compress", project / "in", project / "new" / "deeper" / "out", *NO_CALIBRATION)
    assert (code, err) == (130, "slim-onnx: interrupted\n")
    assert not (project / "new").exists()


def test_ctrl_c_in_inspect_and_eval(capsys, project, monkeypatch):
    monkeypatch.setattr(pipeline, "load_model", interrupt)
    monkeypatch.setattr("slim_onnx.evaluate.load_model", interrupt)
    assert run(capsys, "inspect", project / "in") == (130, "slim-onnx: interrupted\n")
    assert run(capsys, "eval", project / "in", "--text", project / "calib.txt") == (130, "slim-onnx: interrupted\n")


# The CLI in a child process that stops, with its temporary output folder written, until SIGINT comes.
STOP_BEFORE_THE_OUTPUT_IS_MOVED = """
import sys, time
from slim_onnx import cli, pipeline
def wait_for_ctrl_c(tmp, out, log):
    print("ready", flush=True)
    time.sleep(60)
pipeline._move_into_place = wait_for_ctrl_c
sys.exit(cli.main(sys.argv[1:]))
"""


def test_a_real_sigint_exits_130_and_removes_the_temporary_folder(project):
    before = snapshot(project)
    child = subprocess.Popen(
        [sys.executable, "-c", STOP_BEFORE_THE_OUTPUT_IS_MOVED, "compress", project / "in", project / "out",
         *NO_CALIBRATION], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline() == "ready\n", child.stderr.read()
        assert leftovers(project)  # the finished temporary folder, about to be moved
        child.send_signal(signal.SIGINT)
        _, err = child.communicate(timeout=60)
    finally:
        child.kill()
    assert (child.returncode, err) == (130, "slim-onnx: interrupted\n")
    assert snapshot(project) == before and not leftovers(project) and not (project / "out").exists()
