"""Issue 15, items 6-8: no silent hang on DeepSpeed's op build lock, no orphaned Ray processes after a
killed driver, official-checkpoint loaders that name a damaged key, and generate's label forms."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
OP = "deepspeed_shm_comm"


def _env(**more: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    env.update({"DS_ACCELERATOR": "cpu", "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
                "PYTHONPATH": os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])})
    env.update(more)
    return env


@pytest.fixture(scope="module")
def built_op_copy(tmp_path_factory) -> Path:
    """A copy of this environment's built op cache (built here once if setup.sh has not yet)."""
    cache = Path(sys.prefix) / "torch_extensions"
    if not (cache / OP / f"{OP}.so").exists():
        subprocess.run([sys.executable, "-c", "from pipeline.train.deepspeed_ops import build; build()"],
                       env=_env(TORCH_EXTENSIONS_DIR=str(cache)), check=True, timeout=900, cwd=REPO)
    copy = tmp_path_factory.mktemp("extensions") / "torch_extensions"
    shutil.copytree(cache / OP, copy / OP, ignore=shutil.ignore_patterns("lock"))
    return copy


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- item 8: DeepSpeed's op build lock ---------------------------------------------------------------

DEEPSPEED_START = """
from pipeline.train.deepspeed_ops import prepare_worker
prepare_worker(0)
import deepspeed
deepspeed.init_distributed("gloo")
import deepspeed.comm.comm as ds_comm
print("started, shm op:", ds_comm.cdb.shm_comm_op is not None, flush=True)
"""


def test_a_stale_op_build_lock_is_removed_with_a_warning_and_deepspeed_starts(built_op_copy):
    lock = built_op_copy / OP / "lock"
    lock.touch()  # what a builder killed midway leaves: the lock, no process holding it
    env = _env(TORCH_EXTENSIONS_DIR=str(built_op_copy), VARRAY_OP_LOCK_STALE_S="0", RANK="0", LOCAL_RANK="0", WORLD_SIZE="1",
               LOCAL_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    result = subprocess.run([sys.executable, "-c", DEEPSPEED_START], env=env, cwd=REPO, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "started, shm op: True" in result.stdout
    assert f"removed the stale build lock {lock}" in result.stderr
    assert not lock.exists()


def test_a_lock_held_by_a_live_builder_is_kept(built_op_copy):
    from pipeline.train import deepspeed_ops

    lock = built_op_copy / OP / "lock"
    holder = subprocess.Popen([sys.executable, "-c", f"import os, time; os.open({str(lock)!r}, os.O_CREAT | os.O_EXCL); "
                               "print('held', flush=True); time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        os.environ["TORCH_EXTENSIONS_DIR"], saved = str(built_op_copy), os.environ.get("TORCH_EXTENSIONS_DIR")
        try:
            assert deepspeed_ops.lock_holders(str(lock)) == [holder.pid]
            assert not deepspeed_ops.remove_stale_lock(stale_after_s=0)
            assert lock.exists()
        finally:
            if saved is None:
                del os.environ["TORCH_EXTENSIONS_DIR"]
            else:
                os.environ["TORCH_EXTENSIONS_DIR"] = saved
    finally:
        holder.kill()
        holder.wait()
        lock.unlink(missing_ok=True)


def test_a_train_start_that_waits_says_what_for(tmp_path):
    """The driver's watchdog names what a start waits for (here: workers that never start training)."""
    script = ("import time; from pipeline.core.ray_runtime import connect_ray; connect_ray(local_num_cpus=2)\n"
              "from pipeline.train.deepspeed_ops import watch_worker_start\n"
              "env = {}; watch_worker_start('tokenizer', 2, env, warn_after_s=1, log=print)\n"
              "assert env['TORCH_EXTENSIONS_DIR']; time.sleep(3)\n")
    result = subprocess.run([sys.executable, "-c", script], env=_env(), cwd=tmp_path, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "tokenizer stage: waiting 1 s for 2 of 2 workers to start training (0 of 2 started; resources free: CPU" \
        in result.stdout, result.stdout


# --- item 6: no orphans after a SIGKILLed driver of the embedded local Ray ------------------------------

DRIVER = """
import os, time
import ray
from pipeline.core.ray_runtime import connect_ray
connect_ray(local_num_cpus=2)
@ray.remote
def pid():
    return os.getpid()
ray.get(pid.remote())
print(ray._private.worker._global_node.get_session_dir_path(), flush=True)
time.sleep(300)
"""


def test_a_killed_driver_leaves_no_ray_processes(tmp_path):
    from pipeline.core.reaper import session_processes

    driver = subprocess.Popen([sys.executable, "-c", DRIVER], env=_env(), cwd=tmp_path, stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True)
    session = None
    try:
        session = driver.stdout.readline().strip()
        assert session, "the driver did not start Ray"
        assert len(session_processes(session)) >= 4  # gcs, raylet, agents, a worker
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait()
        deadline = time.monotonic() + 8
        while (left := session_processes(session)) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not left, [f"{p.pid} {p.name()}" for p in left]
    finally:
        driver.kill()
        for process in session_processes(session) if session else []:
            process.kill()  # on the old code: what the killed driver left


# --- item 7: official-checkpoint loaders, generate's labels ---------------------------------------------


def _official_var_state(**fields):
    from var_model import VAR, VARConfig

    config = VARConfig(**{"hidden_size": 32, "num_layers": 2, "num_heads": 2, "scales": (1, 2), "codebook_size": 16,
                          "embed_dim": 4, "num_classes": 4, **fields})
    torch.manual_seed(0)
    return VAR(config).eval()


def test_a_stray_block_key_is_named_not_read_as_a_deeper_model():
    from var_model import load_official_var

    model = _official_var_state()
    state = dict(model.state_dict(), **{"blocks.2.ffn.fc1.weight": torch.zeros(128, 32)})
    with pytest.raises(ValueError) as error:
        load_official_var(state)
    message = str(error.value)
    assert "blocks.2.ffn.fc1.weight" in message and len(message) < 400, message


def test_a_checkpoint_without_qk_norm_needs_num_heads():
    from var_model import load_official_var

    model = _official_var_state(attn_l2_norm=False, num_heads=4)  # heads != depth
    state = model.state_dict()
    with pytest.raises(ValueError, match="num_heads") as error:
        load_official_var(state)
    assert "\n" not in str(error.value)
    loaded = load_official_var(state, num_heads=4)
    labels, teacher = torch.tensor([1]), torch.randn(1, 4, 4)
    with torch.no_grad():
        assert torch.equal(loaded(labels, teacher), model(labels, teacher))


def test_a_stray_tokenizer_level_key_is_named():
    from var_model import VQVAE, TokenizerConfig, load_official_tokenizer

    tokenizer = VQVAE(TokenizerConfig(image_size=16, in_channels=1, scales=(1, 2, 4), codebook_size=16, embed_dim=4,
                                      base_channels=8, channel_multipliers=(1, 2, 2), num_res_blocks=1,
                                      use_attention=False, norm_groups=4))
    state = dict(tokenizer.state_dict(), **{"encoder.down.3.block.0.conv1.weight": torch.zeros(16, 16, 3, 3)})
    with pytest.raises(ValueError) as error:
        load_official_tokenizer(state, image_size=16, scales=(1, 2, 4))
    message = str(error.value)
    assert "encoder.down.3.block.0.conv1.weight" in message and len(message) < 400, message


def test_generate_takes_one_int_label_or_none_for_unconditional():
    from var_model import VQVAE, TokenizerConfig, generate

    var = _official_var_state()
    tokenizer = VQVAE(TokenizerConfig(image_size=8, in_channels=1, scales=(1, 2), codebook_size=16, embed_dim=4,
                                      base_channels=8, channel_multipliers=(1, 2, 2), num_res_blocks=1,
                                      use_attention=False, norm_groups=4)).eval()
    same = generate(var, tokenizer, torch.tensor([3, 3]), seeds=torch.tensor([5, 6]))
    one = generate(var, tokenizer, 3, seeds=torch.tensor([5, 6]))
    assert torch.equal(one.images, same.images)
    null = generate(var, tokenizer, torch.tensor([4, 4]), seeds=torch.tensor([5, 6]))
    unconditional = generate(var, tokenizer, None, seeds=torch.tensor([5, 6]))
    assert torch.equal(unconditional.images, null.images)
    assert generate(var, tokenizer, 1, batch_size=3, seeds=0).images.shape[0] == 3
