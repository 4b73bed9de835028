"""``agentforge.load``: every artifact of a micro run opens ready to answer, with the parts the
pipeline trained (experts with their router, the thinking head) attached; a part that is there
but cannot be attached is an error, not a silent drop."""

import json
import shutil

import pytest
import torch

import agentforge
from agentforge import pipeline
from agentforge.artifacts import CorruptArtifact
from agentforge.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def micro_run(tmp_path_factory):
    run = pipeline.prepare(out=tmp_path_factory.mktemp("load") / "run", preset="micro")
    pipeline.execute(run, progress=False, say=lambda _: None)
    return run.dir


def test_every_phase_directory_loads_with_the_parts_it_holds(micro_run):
    parts = {spec.name: agentforge.load(micro_run / spec.dirname).parts for spec in pipeline.default_phases()}
    thinking_from = ["quietstar", "bitnet", "curriculum", "baking", "experts", "compression"]
    assert {name for name, p in parts.items() if p["thinking"]} == set(thinking_from)
    assert {name for name, p in parts.items() if p["experts"]} == {"experts", "compression"}


def test_the_final_artifact_routes_each_prompt_and_answers_on_the_kernels(micro_run):
    from agentforge.nn import BitLinear

    agent = agentforge.load(micro_run / "08-compression" / "model.afz")
    layers = [m for m in agent.lm.modules() if isinstance(m, BitLinear)]
    assert layers and all(m.state == "packed" for m in layers)
    answers = agent.complete(["3+4=", "bits 13=", "a7=3 k2=9 ?k2="], max_new_tokens=4)
    assert len(answers) == 3 and len(agent.last_routes) == 3
    assert set(agent.last_routes) <= set(agent.experts.router.classes)
    # the class weights go back after each class: the base weights answer the same as before
    before = [m.w_prepacked.clone() for m in layers]
    agent.complete(["3+4="], max_new_tokens=2)
    assert all(torch.equal(a, m.w_prepacked) for a, m in zip(before, layers))


def test_the_compression_report_scores_the_artifact_with_and_without_its_experts(micro_run):
    summary = json.loads((micro_run / "08-compression" / "summary.json").read_text())
    routed, base = summary["test_after"], summary["test_without_experts"]
    assert base["accuracy_mean"] >= 0 and set(base["scores"]) == set(routed["scores"])
    effect = next(e for e in summary["effects"] if e["what"].startswith("held-out task accuracy, artifact two-pass"))
    assert effect["control"] == "the artifact without its experts"
    items = lambda report: [x for domain in report["scores"].values() for x in domain]
    differences = [a - b for a, b in zip(items(routed), items(base))]
    assert effect["value"] == pytest.approx(sum(differences) / len(differences))


def test_thinking_and_streaming_chat(micro_run):
    agent = agentforge.load(micro_run / "08-compression" / "model.afz")
    assert agent.complete(["3+4="], max_new_tokens=3, think=True)[0] is not None
    pieces = []
    reply = agent.chat([{"role": "user", "content": "3+4="}], max_new_tokens=4, stream=pieces.append)
    assert "".join(pieces).strip() == reply


def test_a_part_that_cannot_be_attached_is_an_error(micro_run, tmp_path):
    broken = tmp_path / "experts"
    shutil.copytree(micro_run / "07-experts" / "model", broken)
    (broken / "expert_weights.safetensors").unlink()
    manifest = json.loads((broken / "agentforge.json").read_text())
    del manifest["files"]["expert_weights.safetensors"]
    (broken / "agentforge.json").write_text(json.dumps(manifest))
    from agentforge.loading import _attach
    from agentforge.nn import pack_bitnet

    lm, tokenizer, metadata = agentforge.artifacts.load_model_dir(broken)
    with pytest.raises(CorruptArtifact, match="experts.json without expert_weights.safetensors"):
        _attach(pack_bitnet(lm), tokenizer, metadata, broken, think=False)


def test_a_phase_with_several_models_names_them(micro_run):
    with pytest.raises(ConfigError, match=r"choose the artifact to load with artifact=... \(it holds: trunk"):
        agentforge.load(micro_run / "01-cognate", artifact="siblings")
    assert agentforge.load(micro_run / "04-bitnet", artifact="latent").lm is not None
