import ctypes
import ctypes.util
import gc
import os
import tempfile

import pytest
import torch

from acnet_convert.blocks import kinds
from acnet_convert.blocks import registry as registry

# Where Ultralytics, Hugging Face (timm), torch.hub and matplotlib would keep settings and caches: a folder of this
# test process, never the home directory or the repository. The tests never download anything.
HOMES = {"YOLO_CONFIG_DIR": "ultralytics", "HF_HOME": "huggingface", "TORCH_HOME": "torch",
         "MPLCONFIGDIR": "matplotlib"}
OFFLINE = {"YOLO_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
_homes = tempfile.TemporaryDirectory(prefix="acnet-tests-")


def pytest_configure(config):
    for variable, folder in HOMES.items():
        os.environ[variable] = os.path.join(_homes.name, folder)
    os.environ.update(OFFLINE)
    if "PYTEST_XDIST_WORKER" in os.environ:
        # As many workers as cores: one thread each (and in the processes they start) does not oversubscribe them.
        torch.set_num_threads(1)
        os.environ["OMP_NUM_THREADS"] = "1"


def pytest_unconfigure(config):
    _homes.cleanup()


def pytest_collection_finish(session):
    """Exempt everything that exists once the tests are collected (modules, parameters) from garbage collection: the
    collection after every test (``_release_memory``) then only looks at what tests created, in milliseconds."""
    gc.collect()
    gc.freeze()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _registry_kept():
    """Kinds a test registers (its own, or a docs example's) are gone after it: other tests see the built-in kinds."""
    kinds()  # loads the built-in kinds before the snapshot
    before = dict(registry._CLASSES)
    yield
    registry._CLASSES.clear()
    registry._CLASSES.update(before)


@pytest.fixture(scope="module")
def one_thread():
    """Run torch on one thread: small tensors gain nothing from more, and on a busy machine extra threads cost a lot."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


_LIBC = ctypes.CDLL(ctypes.util.find_library("c")) if ctypes.util.find_library("c") else None


@pytest.fixture(autouse=True)
def _release_memory():
    """Give freed tensors back to the system after every test: the model zoos allocate and free gigabytes, and one
    long process would otherwise keep the fragments."""
    yield
    gc.collect()
    if _LIBC is not None and hasattr(_LIBC, "malloc_trim"):
        _LIBC.malloc_trim(0)
