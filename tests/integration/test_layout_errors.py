"""A layout that names a module the model lacks: streamtap.LayoutError with the module's full path, whether
the layout is bound directly (streamtap.layouts.bind) or registered and picked by a tap, and nothing written."""

import dataclasses

import pytest
from transformers import LlamaConfig, LlamaForCausalLM

import streamtap as st
import streamtap.layouts as layouts
from streamtap.layouts import INPUT, Attn, Mlp, bind, layout_for
from streamtap.models import tiny_model

# (what is broken, how, the full module path the message must name)
BROKEN = [
    ("attention output projection",
     lambda lay: _replace_step(lay, Attn, proj="self_attn.o_proj_typo"), "model.layers.0.self_attn.o_proj_typo"),
    ("MLP term", lambda lay: _replace_step(lay, Mlp, term="mlp_typo"), "model.layers.0.mlp_typo"),
    ("MLP down projection", lambda lay: _replace_step(lay, Mlp, down="mlp.down_typo"), "model.layers.0.mlp.down_typo"),
    ("final residual", lambda lay: dataclasses.replace(lay, resid_final=("norm_typo", INPUT)), "model.norm_typo"),
]


def _replace_step(layout, kind, **changes):
    block = tuple(dataclasses.replace(step, **changes) if isinstance(step, kind) else step for step in layout.block)
    return dataclasses.replace(layout, block=block)


@pytest.mark.parametrize("what, breaks, path", BROKEN, ids=[b[0] for b in BROKEN])
def test_binding_a_layout_names_the_full_path_of_the_missing_module(what, breaks, path):
    model = tiny_model("llama")
    layout = layout_for(model)
    bind(layout, model)  # the layout as shipped binds
    with pytest.raises(st.LayoutError) as info:
        bind(dataclasses.replace(breaks(layout), name="broken"), model)
    message = str(info.value)
    assert isinstance(info.value, st.StreamtapError)
    assert repr(path) in message and "layout 'broken'" in message and "docs/layouts.md" in message, message


def test_a_missing_block_list_is_a_layout_error_naming_it():
    model = tiny_model("llama")
    with pytest.raises(st.LayoutError, match=r"layout 'broken': LlamaForCausalLM has no module list at .*layerz"):
        bind(dataclasses.replace(layout_for(model), name="broken", layers="layerz"), model)


def test_a_registered_layout_with_a_missing_module_stops_the_tap_before_anything_is_written(tmp_path):
    class OnlyHereConfig(LlamaConfig):
        model_type = "streamtap-test-broken-layout"  # no other test, and no shipped layout, knows it

    model = LlamaForCausalLM(OnlyHereConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=2, vocab_size=64)).eval()
    shipped = layout_for(tiny_model("llama"))
    broken = dataclasses.replace(_replace_step(shipped, Attn, proj="self_attn.out_proj_typo"), name="broken",
                                 model_types=(OnlyHereConfig.model_type,))
    saved = list(layouts.LAYOUTS)
    try:
        layouts.register(broken)
        assert layout_for(model) is broken
        with pytest.raises(st.LayoutError, match=r"'model\.layers\.0\.self_attn\.out_proj_typo'"):
            with st.tap(model, tmp_path / "s.zarr"):
                pass
    finally:
        layouts.LAYOUTS[:] = saved  # no layout for the test's model type outlives the test
    assert not (tmp_path / "s.zarr").exists()
    assert "forward" not in model.__dict__
    assert OnlyHereConfig.model_type not in layouts.supported_model_types()
    with pytest.raises(st.UnsupportedArchitectureError):
        layout_for(model)
