"""SGLang frontend names and arguments a migrating program uses: the top-level names, ``select`` /
``gen`` / ``gen_int`` signatures, ``run_batch`` with positional items, ``@function`` options,
``cache`` / ``compile``, ``state.ret_value``, and ``Runtime``'s ``ServerArgs`` keywords."""

from __future__ import annotations

import inspect

import pytest

import llmir_lang as llmir
from llmir_lang.dsl.runtime import sglang_engine_options
from llmir_lang.errors import CheckpointError, InvalidRequestError, NotYetSupportedError

SGLANG_NAMES = (
    "Runtime", "RuntimeEndpoint", "OpenAI", "function", "gen", "gen_int", "gen_string", "select",
    "image", "video", "flush_cache", "get_server_info", "set_default_backend", "system", "user",
    "assistant", "system_begin", "system_end", "user_begin", "user_end", "assistant_begin",
    "assistant_end", "token_length_normalized", "greedy_token_selection",
    "unconditional_likelihood_normalized", "separate_reasoning", "Engine",
)  # fmt: skip


def _line(fn, needle: str) -> int:
    lines, start = inspect.getsourcelines(fn)
    return start + next(i for i, text in enumerate(lines) if needle in text)


# --- names --------------------------------------------------------------------------------------
def test_sglang_top_level_names_resolve():
    for name in SGLANG_NAMES:
        assert getattr(llmir, name) is not None, name
        assert name in dir(llmir)
    assert issubclass(llmir.RuntimeEndpoint, llmir.Endpoint)


def test_image_and_video_raise_a_typed_error_at_the_users_line(fake):
    with pytest.raises(llmir.FeatureNotSupportedError, match="multimodal") as e:
        llmir.image("cat.png")
    assert isinstance(e.value, NotYetSupportedError) and isinstance(e.value, llmir.DSLError)
    here = test_image_and_video_raise_a_typed_error_at_the_users_line
    assert e.value.where.line == _line(here, 'llmir.image("cat.png")')
    with pytest.raises(NotYetSupportedError, match="video"):
        llmir.video("clip.mp4", 4)

    @llmir.function
    def describe(s, path):
        s += llmir.user(llmir.image(path) + "What is this?")
        s += llmir.assistant(llmir.gen("a", max_tokens=4))

    with pytest.raises(llmir.FeatureNotSupportedError) as e:
        describe.run(path="cat.png", backend=fake)
    assert e.value.program == "describe" and e.value.where.line == _line(describe.func, "llmir.image(path)")


def test_flush_cache_and_get_server_info_need_a_backend_that_has_them(fake):
    llmir.set_default_backend(None)
    with pytest.raises(llmir.NoBackendError, match="set_default_backend"):
        llmir.flush_cache()
    with pytest.raises(llmir.NoBackendError):
        llmir.get_server_info()
    with pytest.raises(NotYetSupportedError, match="FakeBackend backend has no flush_cache"):
        llmir.flush_cache(fake)

    calls = []

    class Flushable(type(fake)):
        def flush_cache(self):
            calls.append("flush")

        def get_server_info(self):
            return {"model_path": "fake"}

    backend = Flushable()
    try:
        llmir.set_default_backend(backend)
        llmir.flush_cache()
        assert calls == ["flush"] and llmir.get_server_info() == {"model_path": "fake"}
    finally:
        llmir.set_default_backend(None)
        backend.pool.shutdown(wait=True)


# --- select -------------------------------------------------------------------------------------
def test_select_takes_sglangs_signature_and_method_objects():
    params = inspect.signature(llmir.select).parameters
    assert list(params) == ["name", "choices", "temperature", "choices_method"]
    assert params["choices_method"].default is llmir.token_length_normalized
    assert llmir.select("x", ["a", "b"], 0.0).choices_method == "token_length_normalized"
    methods = ("token_length_normalized", "greedy_token_selection", "unconditional_likelihood_normalized")
    for method in methods:
        assert llmir.select("x", ["a", "b"], choices_method=getattr(llmir, method)).choices_method == method
        assert llmir.select("x", ["a", "b"], choices_method=method).choices_method == method
    # llmir's earlier positional form (the method third) still reads as the method
    assert llmir.select("x", ["a", "b"], "greedy_token_selection").choices_method == "greedy_token_selection"
    assert llmir.select("x", ["a", "b"], 1e-6).name == "x"  # below the greedy threshold: greedy
    with pytest.raises(llmir.FeatureNotSupportedError, match="temperature=0.7") as e:
        llmir.select("x", ["a", "b"], 0.7)
    assert "gen(name, choices=" in str(e.value)
    with pytest.raises(llmir.DSLError, match="custom scoring methods are not supported"):
        llmir.select("x", ["a", "b"], choices_method=lambda **kw: None)


def test_select_takes_sglangs_own_method_objects():
    sgl_choices = pytest.importorskip("sglang.lang.choices")
    for name in ("token_length_normalized", "greedy_token_selection", "unconditional_likelihood_normalized"):
        assert llmir.select("x", ["a", "b"], choices_method=getattr(sgl_choices, name)).choices_method == name


def test_select_objects_pick_as_their_names(fake):
    @llmir.function
    def prog(s, method):
        s += "Which colour is it? Answer: "
        s += llmir.select("c", ["red apple", "blue", "green tea leaves"], choices_method=method)

    for name in ("greedy_token_selection", "unconditional_likelihood_normalized"):
        by_object = prog.run(method=getattr(llmir, name), backend=fake)
        assert by_object["c"] == prog.run(method=name, backend=fake)["c"]
        assert by_object.get_meta_info("c")["choices"] == ["red apple", "blue", "green tea leaves"]


def test_an_unnamed_select_appends_its_choice_and_keeps_no_variable(fake):
    @llmir.function
    def prog(s):
        s += "PREFER:no Is it? "
        for _ in range(2):  # two unnamed selects in one state
            s += llmir.select(choices=["yes", "no"]) + "."
        forks = s.fork(2)
        forks += llmir.select(choices=["no", "yes"])
        forks.join("concate_and_append")

    st = prog.run(backend=fake)
    assert st.text() == "PREFER:no Is it? no.no.nono"
    assert st.variables() == {}


def test_repeated_choices_are_scored_once_and_the_first_wins(fake):
    sel = llmir.select("x", ["a", "b", "a"])
    assert sel.choices == ["a", "b", "a"]  # kept: the meta info follows them (SGLang's shape)
    assert llmir.gen("g", choices=["1", "2", "1"]).attrs["choices"] == ["1", "2"]

    @llmir.function
    def prog(s):
        s += "PREFER:b pick: " + llmir.select("x", ["b", "a", "b"])

    st = prog.run(backend=fake)
    meta = st.get_meta_info("x")
    assert st["x"] == "b" and meta["choices"] == ["b", "a", "b"] and meta["picked"] == 0
    assert fake.scores == [("PREFER:b pick: ", ["b", "a"])]


# --- gen ----------------------------------------------------------------------------------------
def test_gen_int_and_gen_string_take_max_tokens_positionally():
    assert llmir.gen_int("x", 8).attrs == {"max_tokens": 8, "dtype": "int"}
    assert llmir.gen_string("x", 8, None, "\n").attrs == {"max_tokens": 8, "stop": ["\n"], "dtype": "str"}
    assert llmir.gen_int("x", min_tokens=1, seed=3).attrs == {"min_tokens": 1, "seed": 3, "dtype": "int"}
    with pytest.raises(llmir.DSLError, match="takes no other constraint"):
        llmir.gen_int("x", regex="[0-9]")


def test_sglang_only_gen_arguments():
    assert llmir.gen("x", n=1, stop_regex=None, choices_method=None).attrs == {}
    assert llmir.gen("x", stop_regex=[]).attrs == {}
    with pytest.raises(llmir.FeatureNotSupportedError, match=r"fork instead.*s.fork\(3\)"):
        llmir.gen("x", n=3)
    with pytest.raises(llmir.FeatureNotSupportedError, match=r"n=2"):
        llmir.gen_int("x", 4, 2)
    with pytest.raises(llmir.DSLError, match="n must be an integer"):
        llmir.gen("x", n=0)
    with pytest.raises(llmir.DSLError, match="stop_regex") as e:
        llmir.gen("x", stop_regex=r"(\d")
    assert e.value.where.line == _line(test_sglang_only_gen_arguments, 'stop_regex=r"(')
    with pytest.raises(llmir.DSLError, match=r"write select\('x', choices="):
        llmir.gen("x", choices=["a", "b"], choices_method=llmir.greedy_token_selection)
    with pytest.raises(llmir.DSLError, match="only applies to choices"):
        llmir.gen("x", choices_method="token_length_normalized")


# --- run_batch, @function, cache, compile, ret_value ------------------------------------------
def test_run_batch_takes_lists_of_positional_values(fake):
    @llmir.function
    def prog(s, question, suffix="?"):
        s += "Q: " + question + suffix + llmir.gen("a", max_tokens=2)

    by_list = prog.run_batch([["one"], ("two", "!")], backend=fake)
    by_dict = prog.run_batch([{"question": "one"}, {"question": "two", "suffix": "!"}], backend=fake)
    assert [st.text() for st in by_list] == [st.text() for st in by_dict]
    with pytest.raises(llmir.ProgramArgumentError, match=r"item 1 has 0 positional value\(s\).*takes 1 to 2"):
        prog.run_batch([["one"], []], backend=fake)
    with pytest.raises(llmir.ProgramArgumentError, match=r"has 3 positional value\(s\)"):
        prog.run_batch([("a", "b", "c")], backend=fake)
    with pytest.raises(llmir.ProgramArgumentError, match="dict of arguments or a list"):
        prog.run_batch(["one"], backend=fake)


def test_function_takes_num_api_spec_tokens(fake):
    @llmir.function(num_api_spec_tokens=64)
    def prog(s, x):
        s += x + llmir.gen("a", max_tokens=2)

    assert prog.num_api_spec_tokens == 64 and prog.bind(x="y").num_api_spec_tokens == 64
    assert prog.run(x="hi", backend=fake)["a"]
    assert llmir.function(lambda s: None, 8).num_api_spec_tokens == 8
    with pytest.raises(llmir.ProgramDefinitionError, match="num_api_spec_tokens"):
        llmir.function(num_api_spec_tokens="many")(lambda s: None)


def test_cache_prefills_the_constant_beginning(fake):
    @llmir.function
    def prog(s, question):
        s += "You answer briefly.\n"
        s += llmir.user("Q: " + question)
        s += llmir.assistant(llmir.gen("a", max_tokens=2))

    prefix = prog.cache(backend=fake)
    assert prefix == "You answer briefly.\n<|im_start|>user\nQ: "
    (req,) = fake.requests
    assert req.prompt == prefix and not req.pin and req.steps[0].params.max_new_tokens == 0
    assert prog.run(question="hi", backend=fake).text().startswith(prefix)

    fake.reset()
    assert llmir.function(lambda s, q: s.__iadd__(q)).cache(backend=fake) == ""
    assert fake.requests == []

    @llmir.function
    def computes(s, n):
        s += "count: " + str(int(n) + 1)

    with pytest.warns(UserWarning, match="cannot be traced"):
        assert computes.cache(backend=fake) == ""


def test_compile_warns_and_returns_the_program(fake):
    @llmir.function
    def prog(s):
        s += "x" + llmir.gen("a", max_tokens=1)

    with pytest.warns(DeprecationWarning, match="compile"):
        compiled = prog.compile()
    assert compiled is prog


def test_state_ret_value_is_the_body_return_value(fake):
    @llmir.function
    def prog(s, k):
        s += "x" + llmir.gen("a", max_tokens=2)
        return {"k": k, "a": s["a"]}

    st = prog.run(k=1, backend=fake)
    assert st.ret_value == {"k": 1, "a": st["a"]}
    assert [st.ret_value["k"] for st in prog.run_batch([{"k": 1}, [2]], backend=fake)] == [1, 2]
    streamed = prog.run(k=3, backend=fake, stream=True)
    "".join(streamed.text_iter())
    streamed.sync()
    assert streamed.ret_value["k"] == 3

    @llmir.function
    def returns_nothing(s):
        s += "x"

    assert returns_nothing.run(backend=fake).ret_value is None


# --- Runtime ------------------------------------------------------------------------------------
def test_runtime_translates_sglang_server_args():
    got = sglang_engine_options(
        None,
        {
            "tp_size": 1, "log_level": "error", "port": 30000, "random_seed": 7, "dtype": "auto",
            "disable_radix_cache": True, "disable_cuda_graph": True, "attention_backend": "torch_native",
            "mem_fraction_static": 0.8, "device": "cpu", "kv_memory": "64MB", "context_length": None,
        },
    )  # fmt: skip
    assert got == {
        "seed": 7, "dtype": None, "enable_prefix_cache": False, "cuda_graphs": False,
        "attention_backend": "torch", "device": "cpu", "kv_memory": "64MB",
    }  # fmt: skip
    with pytest.raises(NotYetSupportedError, match=r"tp_size=2.*RuntimeEndpoint"):
        sglang_engine_options(None, {"tp_size": 2})
    with pytest.raises(NotYetSupportedError, match="context length"):
        sglang_engine_options(None, {"context_length": 4096})
    with pytest.raises(InvalidRequestError, match="unknown option 'warp_factor'"):
        sglang_engine_options(None, {"warp_factor": 9})
    with pytest.raises(InvalidRequestError, match="both 'seed' and 'random_seed'"):
        sglang_engine_options(None, {"seed": 1, "random_seed": 2})


def test_runtime_errors_before_loading_a_model():
    with pytest.raises(NotYetSupportedError, match="one GPU"):
        llmir.Runtime(tp_size=4)
    with pytest.raises(CheckpointError, match="huggingface-cli download no-such-org/no-such-model"):
        llmir.Runtime(model_path="no-such-org/no-such-model", tp_size=1)


def test_runtime_sglang_methods(rt):
    info = rt.get_server_info()
    assert {"version", "model_path", "device", "dtype", "context_length", "internal_states"} <= set(info)
    assert rt.get_tokenizer().encode("hello")

    @llmir.function
    def prog(s):
        s += "A long constant few-shot prefix that is worth caching once. Q: 1 + 1 = "
        s += llmir.gen("a", max_tokens=2)

    rt.flush_cache()
    assert prog.cache(backend=rt).startswith("A long constant")
    assert prog.run(backend=rt).get_meta_info("a")["cached_tokens"] > 0  # the run starts from it
    llmir.set_default_backend(rt)
    try:
        assert llmir.get_server_info()["model_path"] == info["model_path"]
        llmir.flush_cache()
    finally:
        llmir.set_default_backend(None)


def test_review_mends(fake):
    """Points a review found: positional items after bind(), an unnamed select reused, numpy
    temperatures, SGLang's model_name=, conflicting Runtime keywords in either order, fork(n=)."""
    import numpy as np


    @llmir.function
    def two(s, a, b):
        s += a + b

    assert [st.text() for st in two.bind(a="A").run_batch([["B"], ("C",)], backend=fake)] == ["AB", "AC"]
    with pytest.raises(llmir.ProgramArgumentError, match="has 2 positional"):
        two.bind(a="A").run_batch([["B", "C"]], backend=fake)

    anon = llmir.select(choices=["x", "y"])

    @llmir.function
    def twice(s):
        s += "A?" + anon + " B?" + anon

    first, second = (str(twice.trace()) for _ in range(2))
    assert first == second  # the hidden name is the same in every trace
    assert twice.run(backend=fake).text().count("?") == 2

    assert llmir.select("x", ["a", "b"], np.float32(0.0)).choices_method == "token_length_normalized"
    assert llmir.OpenAI(model_name="m", base_url="http://h/v1").model == "m"
    for opts in ({"seed": 1, "random_seed": 2}, {"random_seed": 2, "seed": 1}):
        with pytest.raises(InvalidRequestError, match="the same option"):
            sglang_engine_options(None, opts)

    @llmir.function
    def forked(s):
        s += "x"
        forks = s.fork(n=2)
        forks += "y"
        forks.join(mode="concate_and_append")

    assert forked.run(backend=fake).text() == "xyy"
