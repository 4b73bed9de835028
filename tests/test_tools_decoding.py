"""agentforge.tools.decoding: generation that runs the calls a model writes, driven by a
scripted model whose next token is read off a script, and the KV-cache path checked against the
full-forward path on a tiny Llama trained to write calls."""

import pytest
import torch
from torch import nn

from agentforge.tools import (
    TOOL_PROMPT,
    SandboxUnavailable,
    ToolCall,
    ToolResult,
    describe_isolation,
    follows_tool_format,
    generate_with_tools,
    generate_with_tools_batch,
    tool_trajectories,
)

pytestmark = pytest.mark.usefixtures("one_thread")


class ScriptedModel(nn.Module):
    """Writes ``script[prompt]`` token by token: at each step it emits the next token of the
    script after the text already in its context, or eos once the context leaves the script
    (e.g. after a tool result that differs from it). It records every context it reads."""

    def __init__(self, tokenizer, script: dict[str, str]):
        super().__init__()
        self.tokenizer, self.script, self.contexts = tokenizer, script, []

    def forward(self, input_ids, attention_mask, position_ids=None):
        vocab = len(self.tokenizer)
        logits = torch.zeros(*input_ids.shape, vocab)
        for row, (ids, mask) in enumerate(zip(input_ids.tolist(), attention_mask.tolist())):
            ids = [i for i, m in zip(ids, mask) if m]
            self.contexts.append(ids)
            text = self.tokenizer.decode(ids)
            prompt = next(p for p in self.script if text.startswith(p))
            target, done = self.script[prompt], text[len(prompt) :]
            rest = target[len(done) :] if target.startswith(done) else ""
            token = (
                self.tokenizer(rest, add_special_tokens=False)["input_ids"][0] if rest else self.tokenizer.eos_token_id
            )
            logits[row, -1, token] = 1.0
        return type("Output", (), {"logits": logits})()


def _stdlib_tokenizer():
    from agentforge.data import load_text, train_tokenizer

    return train_tokenizer(load_text("stdlib", max_docs=10), 320)


@pytest.fixture(scope="module")
def tokenizer():
    return _stdlib_tokenizer()


def test_a_calc_call_is_run_and_generation_continues(tokenizer):
    model = ScriptedModel(tokenizer, {"37*48=": "[calc: 37*48][out: 1776]1776"})
    text, calls = generate_with_tools(model, tokenizer, "37*48=", max_new_tokens=40)
    assert text == "[calc: 37*48][out: 1776]1776" and follows_tool_format(text)
    assert calls == [(ToolCall("calc", "37*48"), ToolResult("1776", True))]


def test_generation_sees_the_real_result_not_its_own_guess(tokenizer):
    model = ScriptedModel(tokenizer, {"q=": "[calc: 2+2][out: 5]5"})
    text, calls = generate_with_tools(model, tokenizer, "q=", max_new_tokens=40)
    assert text == "[calc: 2+2][out: 4]" and calls[0][1] == ToolResult("4", True)


@pytest.mark.parametrize("isolation", ["os", "unsafe-inprocess"])
def test_python_call_and_call_limit(tokenizer, isolation):
    if isolation == "os":
        try:
            describe_isolation("os")
        except SandboxUnavailable as refusal:
            pytest.skip(f"OS isolation refused on this machine: {refusal}")
    script = "[py: print(6*7)][out: 42][calc: 1+1][out: error: at most 1 tool calls]42"
    model = ScriptedModel(tokenizer, {"a=": script})
    text, calls = generate_with_tools(model, tokenizer, "a=", max_new_tokens=80, max_calls=1, isolation=isolation)
    assert text == script and [c.name for c, _ in calls] == ["py", "calc"] and not calls[1][1].ok


def test_malformed_and_unknown_calls_never_raise(tokenizer):
    script = {
        "a=": "[calc 1+1] [calc: 1+] [search: x][out: error: unknown tool 'search'; tools: calc, py]0",
        "b=": "[py: print(1",
    }
    model = ScriptedModel(tokenizer, script)
    (a, a_calls), (b, b_calls) = generate_with_tools_batch(model, tokenizer, ["a=", "b="], max_new_tokens=120)
    assert a.startswith("[calc 1+1] [calc: 1+][out: error: cannot parse '1+']")
    assert [c.name for c, _ in a_calls] == ["calc"] and b == "[py: print(1" and b_calls == []


def test_a_token_running_past_the_bracket_is_cut():
    tok = _stdlib_tokenizer()
    tok.add_tokens(["]+7"])  # one token holding the ']' and text after it
    model = ScriptedModel(tok, {"q=": "[calc: 2+3]+7"})
    text, calls = generate_with_tools(model, tok, "q=", max_new_tokens=40)
    overhang = tok.convert_tokens_to_ids("]+7")
    assert text == "[calc: 2+3][out: 5]" and calls == [(ToolCall("calc", "2+3"), ToolResult("5", True))]
    assert all(overhang not in ctx for ctx in model.contexts)  # the model never read the overhang


def test_batch_matches_one_at_a_time(tokenizer):
    script = {"1+2=": "[calc: 1+2][out: 3]3", "10*10=": "[calc: 10*10][out: 100]100", "x=": "7"}
    batch = generate_with_tools_batch(
        ScriptedModel(tokenizer, script), tokenizer, list(script), max_new_tokens=30, batch_size=2
    )
    single = [generate_with_tools(ScriptedModel(tokenizer, script), tokenizer, p, max_new_tokens=30) for p in script]
    assert batch == single and [t for t, _ in batch] == list(script.values())


def test_max_new_tokens_counts_model_tokens_only(tokenizer):
    model = ScriptedModel(tokenizer, {"q=": "[calc: 9*9][out: 81]81"})
    text, _ = generate_with_tools(
        model, tokenizer, "q=", max_new_tokens=len(tokenizer("[calc: 9*9]", add_special_tokens=False)["input_ids"])
    )
    assert text == "[calc: 9*9][out: 81]"


def test_tool_trajectories_mark_what_the_runtime_wrote(tokenizer):
    script = {"37*48=": "[calc: 37*48][out: 1776]1776", "x=": "7"}
    model = ScriptedModel(tokenizer, script)
    contexts = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in script]
    for context, (ids, written) in zip(
        contexts, tool_trajectories(model, tokenizer, contexts, max_new_tokens=30, temperature=0.0)
    ):
        assert len(ids) == len(written) and ids[-1] == tokenizer.eos_token_id and written[-1]
        by_runtime = tokenizer.decode([i for i, w in zip(ids, written) if not w])
        by_model = tokenizer.decode([i for i, w in zip(ids, written) if w], skip_special_tokens=True)
        prompt = tokenizer.decode(context)
        assert by_runtime == ("[out: 1776]" if prompt == "37*48=" else "")
        assert by_model == script[prompt].replace(by_runtime, "")


def test_sampled_tool_generation_is_seeded(tokenizer):
    model = ScriptedModel(tokenizer, {"q=": "[calc: 9*9][out: 81]81"})  # near-uniform next-token distribution

    def sample(seed):
        return generate_with_tools_batch(model, tokenizer, ["q="] * 3, max_new_tokens=8, temperature=1.0, seed=seed)

    first = sample(5)
    assert first == sample(5) and first != sample(6)
    assert len({text for text, _ in first}) > 1  # the rows of one batch draw different tokens


def test_bad_arguments_are_one_line_errors(tokenizer):
    model = ScriptedModel(tokenizer, {"q=": "1"})
    with pytest.raises(ValueError, match="max_new_tokens must be a positive int"):
        generate_with_tools(model, tokenizer, "q=", max_new_tokens=0)
    with pytest.raises(TypeError, match="prompt must be a string"):
        generate_with_tools(model, tokenizer, ["q="], max_new_tokens=3)
    with pytest.raises(TypeError, match="not one string"):
        generate_with_tools_batch(model, tokenizer, "q=", max_new_tokens=3)
    with pytest.raises(ValueError, match="encodes to no tokens"):
        generate_with_tools(model, tokenizer, "", max_new_tokens=3)
    with pytest.raises(ValueError, match="isolation must be one of os, unsafe-inprocess"):
        generate_with_tools(model, tokenizer, "q=", max_new_tokens=3, isolation="off")


# ---------------------------------------------------------------------------------------------
# the KV cache, on a tiny Llama trained to write calls


def _tiny_llama(tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )
    return LlamaForCausalLM(config)


def _encode(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


@pytest.fixture(scope="module")
def llama_writing_calls():
    """``(model, tokenizer, prompts)``: a tiny Llama that has memorised tool traces, including
    one whose call it writes one character per token (the runtime re-encodes those ids, so the
    cache must drop ids it already holds), one whose ']' token runs past the bracket, and one
    whose guessed result differs from the real one."""
    tok = _stdlib_tokenizer()
    tok.add_tokens(["]+7"])
    eos = tok.eos_token_id
    traces = {
        "12+7=": "[calc: 12+7][out: 19]19",
        "3*4=": "[calc: 3*4][out: 12]12",
        "9*9=": "[calc: 9*9][out: 80]80",
        "2*3=": "[calc: 2*3][out: 6]then [calc: 6+1][out: 7]7",
        "o=": "[calc: 2+3]+7[out: 5]5",
    }
    sequences = [_encode(tok, prompt + trace) + [eos] for prompt, trace in traces.items()]
    spelled = "[calc: 5+5]"
    sequences.append(_encode(tok, "r=") + [_encode(tok, ch)[0] for ch in spelled] + _encode(tok, "[out: 10]10") + [eos])
    torch.manual_seed(0)
    model = _tiny_llama(tok)
    width = max(map(len, sequences))
    ids = torch.tensor([s + [tok.pad_token_id] * (width - len(s)) for s in sequences])
    labels = torch.where(torch.arange(width) < torch.tensor([[len(s)] for s in sequences]), ids, -100)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(150):
        loss = model(input_ids=ids, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.05, loss.item()
    assert _encode(tok, spelled) != [_encode(tok, ch)[0] for ch in spelled]  # re-encoding changes those ids
    return model, tok, [*traces, "r=", "hello"]


def _decode_both(model, run):
    """``run()`` with the KV cache and without it (``generation_config.use_cache``, the switch
    generation reads), and the widths of the inputs each fed the model."""
    widths = {}
    for use_cache in (True, False):
        model.generation_config.use_cache = use_cache
        seen = widths[use_cache] = []

        def record(_, args, kwargs, seen=seen):
            seen.append(kwargs["input_ids"].shape[1])

        hook = model.register_forward_pre_hook(record, with_kwargs=True)
        try:
            widths[use_cache, "out"] = run()
        finally:
            hook.remove()
    model.generation_config.use_cache = True
    return widths[True, "out"], widths[False, "out"], widths


@pytest.mark.parametrize("temperature, seed", [(0.0, 0), (1.0, 3), (1.0, 4)])
def test_kv_cache_generation_equals_full_forward(llama_writing_calls, temperature, seed):
    model, tok, prompts = llama_writing_calls
    cached, full, widths = _decode_both(
        model,
        lambda: generate_with_tools_batch(
            model, tok, prompts, max_new_tokens=40, batch_size=4, temperature=temperature, seed=seed
        ),
    )
    assert cached == full
    # the cached path feeds a step's new ids only: one each, or a call's segment and result
    assert widths[True].count(1) > len(widths[True]) / 2 and sum(widths[True]) < sum(widths[False]) / 3
    calls = [call for _, row_calls in cached for call, _ in row_calls]
    assert len(calls) >= 3 and ToolCall("calc", "2+3") in calls  # calls ran mid-generation
    if temperature == 0:
        texts = dict(zip(prompts, (text for text, _ in cached)))
        assert texts["9*9="].startswith("[calc: 9*9][out: 81]")  # the real result, not the memorised guess
        assert texts["o="].startswith("[calc: 2+3][out: 5]")  # the overhang was cut
        assert texts["r="].startswith("[calc: 5+5][out: 10]")  # the spelled call was re-encoded


def test_kv_cache_trajectories_equal_full_forward(llama_writing_calls):
    model, tok, prompts = llama_writing_calls
    contexts = [_encode(tok, prompt) for prompt in prompts]
    cached, full, _ = _decode_both(
        model, lambda: tool_trajectories(model, tok, contexts, max_new_tokens=30, batch_size=3, temperature=1.0, seed=1)
    )
    assert cached == full and sum(not all(written) for _, written in cached) >= 3  # rows with tool results


def test_runs_on_a_real_model_and_restores_training_mode(tokenizer):
    torch.manual_seed(0)
    model = _tiny_llama(tokenizer).train()
    outputs = generate_with_tools_batch(model, tokenizer, [TOOL_PROMPT + " 12+7=", "3*4="], max_new_tokens=12)
    assert all(isinstance(text, str) and all(isinstance(r, ToolResult) for _, r in calls) for text, calls in outputs)
    assert model.training  # generation ran in eval mode and restored the training flag
