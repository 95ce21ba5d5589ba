"""Bad models and inputs fail with a message that names the node and the problem, never a crash."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from helpers import random_weights
from onnx import TensorProto, helper, numpy_helper

import slim_onnx
from slim_onnx import make_slim_matmul_model
from slim_onnx.node_builder import add_fallback_functions


def session(model):
    return ort.InferenceSession(model.SerializeToString(), slim_onnx.session_options())


def set_attr(model, name, value):
    node = model.graph.node[0]
    for attr in node.attribute:
        if attr.name == name:
            node.attribute.remove(attr)
            break
    node.attribute.append(helper.make_attribute(name, value))
    return model


@pytest.fixture
def model(rng):
    return make_slim_matmul_model(random_weights(rng, 64, 16, group_size=32))


@pytest.mark.parametrize(
    "attr,value,message",
    [
        ("bits", 3, "bits=3 is not supported"),
        ("group_size", 12, "group_size=12 must be a multiple of 8"),
        ("adapter_format", "int2", "adapter_format must be"),
        ("rank", 4, "rank=4 disagrees with adapter_format"),
        ("N", 24, "input 'W' must be uint8 \\[3, 8, 24\\]"),
        ("K", 72, "input 'W' must be uint8 \\[2, 9, 24\\]"),
        ("sparse", 0, "input 'W' must be uint8 \\[2, 8, 32\\]"),
        ("group_size", 16, "input 'W_scales' must be float16 \\[4, 16\\]"),
    ],
)
def test_inconsistent_attributes_fail_session_creation(model, attr, value, message):
    with pytest.raises(Exception, match=f"SlimMatMul node 'slim_matmul': {message}"):
        session(set_attr(model, attr, value))


def test_corrupt_packed_tensor_size(model):
    init = next(i for i in model.graph.initializer if i.name.endswith("/W"))
    arr = numpy_helper.to_array(init)
    init.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(arr[:, :7]), init.name))
    with pytest.raises(Exception, match="input 'W' must be uint8 \\[2, 8, 24\\], got uint8 \\[2, 7, 24\\]"):
        session(model)


def test_wrong_activation_width_fails_the_run(model, rng):
    model.graph.input[0].type.tensor_type.shape.dim[-1].dim_param = "k"  # let the bad shape reach the kernel
    s = session(model)
    with pytest.raises(Exception, match="slim_matmul.*input 'A' must have last dimension K=64, got shape \\[2, 63\\]"):
        s.run(None, {"A": rng.standard_normal((2, 63)).astype(np.float32)})
    # the session stays usable
    assert s.run(None, {"A": rng.standard_normal((2, 64)).astype(np.float32)})[0].shape == (2, 16)


def test_wrong_activation_type_fails_the_run(rng):
    w = random_weights(rng, 16, 8, group_size=8)
    model = make_slim_matmul_model(w)
    model.graph.input[0].type.tensor_type.elem_type = TensorProto.DOUBLE
    model.graph.output[0].type.tensor_type.elem_type = TensorProto.DOUBLE
    s = session(model)
    with pytest.raises(Exception, match="input 'A' must be float32 or float16, got another type"):
        s.run(None, {"A": np.ones((1, 16))})


def test_runtime_weights_are_validated_per_run(rng):
    """W as a graph input (not an initializer): checked at every run instead of at creation."""
    w = random_weights(rng, 32, 8, group_size=16)
    model = make_slim_matmul_model(w)
    graph = model.graph
    w_init = next(i for i in graph.initializer if i.name.endswith("/W"))
    graph.initializer.remove(w_init)
    graph.input.append(helper.make_tensor_value_info(w_init.name, TensorProto.UINT8, None))
    s = session(model)
    a = rng.standard_normal((3, 32)).astype(np.float32)
    y = s.run(None, {"A": a, w_init.name: w.w})[0]
    np.testing.assert_allclose(y, slim_onnx.reference_slim_matmul(a, w, 4), rtol=1e-4, atol=1e-4)
    with pytest.raises(Exception, match="input 'W' must be uint8 \\[1, 4, 24\\], got uint8 \\[1, 3, 24\\]"):
        s.run(None, {"A": a, w_init.name: w.w[:, :3]})


def test_missing_adapter_inputs(rng):
    w = random_weights(rng, 32, 8, group_size=16, adapter_format="int4", rank=4)
    model = make_slim_matmul_model(w)
    node = model.graph.node[0]
    del node.input[6:]
    with pytest.raises(Exception, match="input 'R' is required by the attributes but absent"):
        session(model)


def test_non_finite_scales_are_rejected(rng):
    w = random_weights(rng, 32, 8, group_size=16)
    w.w_scales[1, 3] = np.inf
    with pytest.raises(Exception, match="non-finite scale at group 1, column 3"):
        session(make_slim_matmul_model(w))


def test_model_passes_the_onnx_checker(rng):
    model = make_slim_matmul_model(random_weights(rng, 32, 8, group_size=16, adapter_format="float16", rank=3, bias=True))
    add_fallback_functions(model)  # idempotent
    assert len(model.functions) == 1
    onnx.checker.check_model(model, full_check=True)


@pytest.mark.parametrize(
    "attr,value,message",
    [
        ("K", "64", "attribute 'K' must be an int, got a string"),
        ("group_size", 32.0, "attribute 'group_size' must be an int, got a float"),
        ("sparse", [1], "attribute 'sparse' must be an int, got a list of ints"),
        ("accuracy_level", [4.0], "attribute 'accuracy_level' must be an int, got a list of floats"),
        ("adapter_format", 1, "attribute 'adapter_format' must be a string, got an int"),
        ("activation", 0, "attribute 'activation' must be a string, got an int"),
        ("K", 2**62, "K=4611686018427387904 is out of range: expected 1 to 2\\^31 - 1"),
        ("N", -1, "N=-1 is out of range"),
        ("group_size", 2**40, "group_size=1099511627776 is out of range"),
        ("rank", -3, "rank=-3 is out of range: expected 0 to 2\\^31 - 1"),
        ("sparse", 2, "sparse=2 must be 0 or 1"),
    ],
)
def test_attributes_of_the_wrong_type_or_range_are_refused(model, attr, value, message):
    """An attribute of another type is never silently its default: the library and the fallback
    function would then compute different things."""
    with pytest.raises(Exception, match=f"SlimMatMul node 'slim_matmul': {message}"):
        session(set_attr(model, attr, value))


def test_missing_required_attribute_is_named(model):
    node = model.graph.node[0]
    node.attribute.remove(next(a for a in node.attribute if a.name == "group_size"))
    with pytest.raises(Exception, match="missing required attribute 'group_size' \\(an int\\)"):
        session(model)
