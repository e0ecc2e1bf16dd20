"""The device layer: selection, every vendor class with its vendor module mocked, the peak table, CPU facts.

Only the CPU is real here. Vendor modules are mocked with monkeypatch (undone after each test), and where
a whole module is replaced it is an autospec of the real torch module, so a misspelt function or a wrong
argument fails here rather than on the hardware.
"""

import inspect
import os
import sys
import types
from unittest import mock

import pytest
import torch

import anychip.device as device_pkg
from anychip.device import Device, DeviceError, available_devices, get_device
from anychip.device import accelerator as accelerator_mod
from anychip.device import cpu as cpu_mod
from anychip.device import mps as mps_mod
from anychip.device.cpu import CpuDevice
from anychip.device.cuda import CudaDevice
from anychip.device.flops import PEAKS, lookup, table_peak_flops
from anychip.device.mps import MpsDevice
from anychip.device.npu import NpuDevice
from anychip.device.xpu import XpuDevice

ORDER = ["cuda", "npu", "xpu", "mps", "cpu"]
VENDOR_CLASSES = [CudaDevice, NpuDevice, XpuDevice, MpsDevice, CpuDevice]
# The methods and properties the training loop calls: renaming one must fail here.
API = [
    "type",
    "torch_device",
    "set_current",
    "dist_backend",
    "device_count",
    "supports_dtype",
    "autocast_dtype",
    "synchronize",
    "memory_stats",
    "reset_peak_memory",
    "manual_seed",
    "rng_state",
    "set_rng_state",
    "name",
    "peak_flops",
    "peak_bandwidth",
    "fused_adamw",
    "prepare_determinism",
    "is_available",
    "unavailable_reason",
]


# -- mocks -----------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def no_accelerators(monkeypatch):
    """Whatever this machine has, every test starts with only the CPU available and no ANYCHIP_DEVICE."""
    monkeypatch.delenv("ANYCHIP_DEVICE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.xpu, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    monkeypatch.setitem(sys.modules, "torch_npu", None)  # a None entry makes `import torch_npu` fail


def enable_cuda(monkeypatch, count=2, name="NVIDIA H100 80GB HBM3"):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)


def enable_npu(monkeypatch, count=8, name="Ascend910B2"):
    """A fake torch_npu in sys.modules and the torch.npu it would install."""
    npu = types.SimpleNamespace(
        is_available=lambda: True,
        device_count=lambda: count,
        current_device=lambda: 0,
        get_device_name=lambda device=None: name,
        is_bf16_supported=lambda: True,
    )
    monkeypatch.setitem(sys.modules, "torch_npu", types.ModuleType("torch_npu"))
    monkeypatch.setattr(torch, "npu", npu, raising=False)


def enable_xpu(monkeypatch):
    monkeypatch.setattr(torch.xpu, "is_available", lambda: True)


def enable_mps(monkeypatch):
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)


ENABLE = {"cuda": enable_cuda, "npu": enable_npu, "xpu": enable_xpu, "mps": enable_mps}


def autospec_module(monkeypatch, cls, real_module, **returns):
    """Replace cls._module() with an autospec of `real_module` (calls must match real signatures)."""
    fake = mock.create_autospec(real_module)
    for name, value in returns.items():
        getattr(fake, name).return_value = value
    monkeypatch.setattr(cls, "_module", classmethod(lambda c: fake))
    return fake


# -- selection -------------------------------------------------------------------------------------


@pytest.mark.parametrize("first", ORDER)
def test_auto_takes_first_available_in_order(monkeypatch, first):
    for name in ORDER[ORDER.index(first) : -1]:
        ENABLE[name](monkeypatch)
    assert available_devices() == ORDER[ORDER.index(first) :]
    assert get_device().type == first
    assert get_device("auto").type == first


def test_only_cpu_when_nothing_else(monkeypatch):
    assert available_devices() == ["cpu"]
    assert isinstance(get_device(), CpuDevice)


def test_env_overrides_auto_and_argument_overrides_env(monkeypatch):
    enable_cuda(monkeypatch)
    monkeypatch.setenv("ANYCHIP_DEVICE", "cpu")
    assert get_device().type == "cpu"
    monkeypatch.setenv("ANYCHIP_DEVICE", "CPU ")  # case and spaces do not matter
    assert get_device().type == "cpu"
    assert get_device("cuda").type == "cuda"
    monkeypatch.setenv("ANYCHIP_DEVICE", "")  # empty means unset
    assert get_device().type == "cuda"


def test_explicit_unavailable_device_is_an_error_not_a_fallback(monkeypatch):
    enable_xpu(monkeypatch)
    with pytest.raises(DeviceError, match=r"'cuda'.*not available.*available here: xpu, cpu"):
        get_device("cuda")
    with pytest.raises(DeviceError, match=r"'npu'.*torch_npu is not installed"):
        get_device("npu")
    monkeypatch.setenv("ANYCHIP_DEVICE", "mps")
    with pytest.raises(DeviceError, match=r"'mps' was requested by ANYCHIP_DEVICE.*not available"):
        get_device()


def test_unknown_name_lists_valid_names(monkeypatch):
    with pytest.raises(DeviceError, match=r"unknown device 'tpu'.*auto, cuda, npu, xpu, mps, cpu"):
        get_device("tpu")
    monkeypatch.setenv("ANYCHIP_DEVICE", "gpu")
    with pytest.raises(DeviceError, match=r"'gpu' \(requested by ANYCHIP_DEVICE\)"):
        get_device()


def test_torch_npu_is_imported_only_when_probed(monkeypatch):
    monkeypatch.delitem(sys.modules, "torch_npu")
    enable_cuda(monkeypatch)
    get_device()  # cuda is found first: npu is never probed
    get_device("cpu")
    assert "torch_npu" not in sys.modules


def test_broken_torch_npu_is_reported_not_skipped(monkeypatch, tmp_path):
    (tmp_path / "torch_npu").mkdir()
    (tmp_path / "torch_npu" / "__init__.py").write_text(
        "raise OSError('libascendcl.so: cannot open shared object file')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "torch_npu")
    with pytest.raises(DeviceError, match=r"torch_npu is installed but failed to import.*libascendcl"):
        get_device()  # auto would otherwise drop to the CPU without a word
    assert get_device("cpu").type == "cpu"  # asking for the CPU does not touch torch_npu


def test_fake_npu_is_found_with_its_name_and_peak(monkeypatch):
    enable_npu(monkeypatch, name="Ascend910B2")
    device = get_device("npu")
    assert isinstance(device, NpuDevice)
    assert device.name() == "Ascend910B2"
    assert device.peak_flops(torch.bfloat16) == pytest.approx(353.8944e12)
    assert device.autocast_dtype() == torch.bfloat16


# -- every vendor class ----------------------------------------------------------------------------


def test_base_declares_the_api():
    for name in API:
        assert hasattr(Device, name) or name in Device.__annotations__, name
    for cls in VENDOR_CLASSES:
        assert all(hasattr(cls, name) for name in API), cls.__name__


@pytest.mark.parametrize("cls", VENDOR_CLASSES, ids=lambda c: c.__name__)
def test_vendor_class_implements_every_method(cls):
    assert not inspect.isabstract(cls), f"{cls.__name__} leaves {sorted(cls.__abstractmethods__)} abstract"
    device = cls()  # must not touch the vendor module
    for name in Device.__abstractmethods__:
        assert getattr(type(device), name) is not getattr(Device, name), f"{cls.__name__}.{name} not implemented"
    assert device.type in ORDER


@pytest.mark.parametrize(
    "cls, backend",
    [
        (CudaDevice, "cuda:nccl,cpu:gloo"),
        (NpuDevice, "npu:hccl,cpu:gloo"),
        (XpuDevice, "xpu:xccl,cpu:gloo"),
        (MpsDevice, "cpu:gloo"),
        (CpuDevice, "cpu:gloo"),
    ],
)
def test_dist_backend(cls, backend):
    assert cls().dist_backend == backend


@pytest.mark.parametrize(
    "cls, real_module, product",
    [
        (CudaDevice, torch.cuda, "NVIDIA H100 80GB HBM3"),
        (XpuDevice, torch.xpu, "Intel(R) Data Center GPU Max 1550"),
        # torch_npu is not installed here; its torch.npu mirrors torch.cuda's API, so torch.cuda is the spec.
        (NpuDevice, torch.cuda, "Ascend910B3"),
    ],
    ids=["cuda", "xpu", "npu"],
)
def test_accelerator_calls_its_module_correctly(monkeypatch, cls, real_module, product):
    state = torch.arange(16, dtype=torch.uint8)
    fake = autospec_module(
        monkeypatch,
        cls,
        real_module,
        is_available=True,
        device_count=2,
        current_device=1,
        get_device_name=product,
        get_rng_state=state,
        memory_allocated=100,
        memory_reserved=300,
        max_memory_allocated=200,
        is_bf16_supported=True,
    )
    if cls is NpuDevice:
        monkeypatch.setitem(sys.modules, "torch_npu", types.ModuleType("torch_npu"))
    probed = []
    monkeypatch.setattr(accelerator_mod, "probe_fused_adamw", lambda dev: probed.append(dev) or True)
    device = cls()
    assert cls.is_available()

    # torch.device("npu") exists only after torch_npu renames torch's privateuse1 backend, which cannot be
    # undone within a process: for npu, the torch.device-building calls are left to the cuda and xpu cases.
    has_device_type = cls is not NpuDevice
    assert device.device_count() == 2
    if has_device_type:
        assert device.torch_device(1) == torch.device(cls.type, 1)
    with pytest.raises(DeviceError, match=rf"local_rank 2 has no {cls.type} device.*{cls.visible_devices_env}"):
        device.torch_device(2)
    device.set_current(1)
    fake.set_device.assert_called_once_with(1)
    with pytest.raises(DeviceError):
        device.set_current(-1)

    assert device.memory_stats() == {"allocated": 100, "reserved": 300, "peak_allocated": 200}
    fake.memory_allocated.assert_called_with(1)  # the current device, not device 0
    device.reset_peak_memory()
    fake.reset_peak_memory_stats.assert_called_once_with(1)
    device.synchronize()
    fake.synchronize.assert_called_once()

    device.manual_seed(7)
    fake.manual_seed_all.assert_called_once_with(7)
    saved = device.rng_state()
    assert set(saved) == {"cpu", cls.type} and torch.equal(saved[cls.type], state)
    device.set_rng_state(saved)
    fake.set_rng_state.assert_called_once_with(state, 1)
    with pytest.raises(DeviceError, match=rf"no '{cls.type}' entry"):
        device.set_rng_state({"cpu": saved["cpu"]})

    assert device.supports_dtype(torch.float32) and device.supports_dtype(torch.bfloat16)
    assert not device.supports_dtype(torch.int64)
    assert device.autocast_dtype() == torch.bfloat16
    assert device.name() == product
    # peak memory bandwidth from the table by the product name (none published here for Max 1550, Ascend)
    assert device.peak_bandwidth() == {CudaDevice: 3.35e12, XpuDevice: None, NpuDevice: None}[cls]
    if has_device_type:
        assert device.fused_adamw() and device.fused_adamw()
        assert probed == [torch.device(cls.type, 1)]  # probed once, on the current device


def test_cuda_without_native_bf16_has_no_autocast(monkeypatch):
    fake = autospec_module(monkeypatch, CudaDevice, torch.cuda, is_bf16_supported=False, current_device=0)
    device = CudaDevice()
    assert not device.supports_dtype(torch.bfloat16)
    fake.is_bf16_supported.assert_called_once_with(including_emulation=False)
    assert device.autocast_dtype() is None
    assert device.supports_dtype(torch.float16)


@pytest.fixture
def restore_determinism():
    yield
    torch.use_deterministic_algorithms(False)


def test_cuda_pins_the_cublas_workspace_before_the_first_kernel(monkeypatch, restore_determinism):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    CudaDevice().prepare_determinism()  # for the recompute audit's deterministic recomputes
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    assert not torch.are_deterministic_algorithms_enabled()
    CudaDevice().prepare_determinism(deterministic=True)
    assert torch.are_deterministic_algorithms_enabled()
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")  # the user's deterministic choice is kept
    CudaDevice().prepare_determinism(deterministic=True)
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":0:0")
    CudaDevice().prepare_determinism()  # not asked for: the user's setting stands
    with pytest.raises(DeviceError, match=r"CUBLAS_WORKSPACE_CONFIG = :4096:8 or :16:8.*':0:0'"):
        CudaDevice().prepare_determinism(deterministic=True)


@pytest.mark.parametrize("cls", [CpuDevice, NpuDevice, XpuDevice, MpsDevice], ids=lambda c: c.__name__)
def test_other_devices_only_set_torchs_deterministic_algorithms(monkeypatch, restore_determinism, cls):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    cls().prepare_determinism(deterministic=True)
    assert torch.are_deterministic_algorithms_enabled() and "CUBLAS_WORKSPACE_CONFIG" not in os.environ
    cls().prepare_determinism(deterministic=False)
    assert not torch.are_deterministic_algorithms_enabled()


def test_unknown_accelerator_has_no_peak(monkeypatch):
    autospec_module(monkeypatch, CudaDevice, torch.cuda, current_device=0, get_device_name="FooChip 9000")
    assert CudaDevice().peak_flops(torch.bfloat16) is None  # never some other chip's figure


def test_mps_calls_its_module_correctly(monkeypatch):
    state = torch.arange(8, dtype=torch.uint8)
    fake = autospec_module(
        monkeypatch,
        MpsDevice,
        torch.mps,
        device_count=1,
        current_allocated_memory=50,
        driver_allocated_memory=80,
        get_rng_state=state,
    )
    monkeypatch.setattr(torch.backends.mps, "is_macos_or_newer", lambda major, minor: False)
    monkeypatch.setattr(mps_mod, "probe_fused_adamw", lambda dev: dev == torch.device("mps"))
    enable_mps(monkeypatch)
    device = get_device("mps")
    assert device.torch_device(3) == torch.device("mps") and device.device_count() == 1
    device.set_current(3)
    assert device.memory_stats() == {"allocated": 50, "reserved": 80, "peak_allocated": 50}
    fake.current_allocated_memory.return_value = 20
    assert device.memory_stats()["peak_allocated"] == 50
    device.reset_peak_memory()
    assert device.memory_stats()["peak_allocated"] == 20
    device.synchronize()
    fake.synchronize.assert_called_once()
    device.manual_seed(3)
    fake.manual_seed.assert_called_once_with(3)
    device.set_rng_state(device.rng_state())
    fake.set_rng_state.assert_called_once_with(state)
    assert not device.supports_dtype(torch.bfloat16)  # before macOS 14: no bf16
    assert device.autocast_dtype() is None
    assert not device.supports_dtype(torch.float64)
    assert device.fused_adamw()
    assert device.peak_flops(torch.float32) is None


# -- peak FLOP/s table -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "product, dtype, expected",
    [
        ("NVIDIA H100 80GB HBM3", torch.bfloat16, 989.5e12),  # H100 SXM
        ("NVIDIA H100 80GB HBM3", torch.float32, 67e12),
        ("NVIDIA H100 PCIe", torch.bfloat16, 756.5e12),
        ("NVIDIA H100 NVL", torch.float16, 835.5e12),
        ("NVIDIA H200", torch.bfloat16, 989.5e12),
        ("NVIDIA H20", torch.bfloat16, 148e12),  # not the H200 row
        ("NVIDIA A100-SXM4-80GB", torch.bfloat16, 312e12),
        ("NVIDIA GB200", torch.bfloat16, 2500e12),  # not the B200 row
        ("NVIDIA B200", torch.bfloat16, 2250e12),
        ("AMD Instinct MI300X", torch.bfloat16, 1307.4e12),
        ("Ascend910B2", torch.bfloat16, 353.8944e12),
        ("Ascend910B4", torch.float16, 245.76e12),
        ("Ascend910B2", torch.float32, None),  # no published dense fp32 figure
        ("Ascend910B2C", torch.bfloat16, None),  # a variant with no known figure
        ("NVIDIA H100", torch.bfloat16, None),  # which H100? unknown, so no guess
        ("NVIDIA H100 80GB HBM3", torch.float64, None),
        ("FooChip 9000", torch.bfloat16, None),
    ],
)
def test_peak_table(product, dtype, expected):
    got = table_peak_flops(product, dtype)
    assert got == (None if expected is None else pytest.approx(expected))


def test_every_peak_row_is_sourced_and_reachable():
    for row in PEAKS:
        assert row.source.strip(), row.chip
        assert row.bf16 is None or row.bf16 > 1e12
    assert lookup("NVIDIA H200 NVL").chip == "H200 NVL"
    assert lookup("NVIDIA H800 PCIe").chip == "H800 PCIe"
    assert lookup("NVIDIA H800").chip == "H800 SXM"


# -- the CPU, for real -----------------------------------------------------------------------------


def test_cpu_peak_flops_is_measured_and_cached(monkeypatch):
    monkeypatch.setattr(cpu_mod, "_MEASURED", {})
    device = CpuDevice()
    measured = device.peak_flops(torch.float32)
    assert measured > 1e9

    def must_not_measure_again(dtype):
        raise AssertionError("measured twice")

    monkeypatch.setattr(cpu_mod, "_measure_matmul_flops", must_not_measure_again)
    assert device.peak_flops(torch.float32) == measured
    assert device.peak_flops(torch.int64) is None


def test_cpu_rng_round_trip_reproduces_random_numbers():
    device = CpuDevice()
    device.manual_seed(1234)
    state = device.rng_state()
    assert set(state) == {"cpu"}
    first = torch.rand(8), torch.randn(3, 3), torch.randint(0, 100, (5,))
    device.set_rng_state(state)
    again = torch.rand(8), torch.randn(3, 3), torch.randint(0, 100, (5,))
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    device.set_rng_state({**state, "cuda": torch.zeros(4, dtype=torch.uint8)})  # other devices' entries: ignored
    with pytest.raises(DeviceError, match=r"no 'cpu' entry"):
        device.set_rng_state({})
    with pytest.raises(DeviceError, match=r"'cpu' must be a uint8 tensor, got tensor of torch.float32"):
        device.set_rng_state({"cpu": torch.zeros(4)})


def test_cpu_memory_stats():
    stats = CpuDevice().memory_stats()
    assert set(stats) == {"allocated", "reserved", "peak_allocated"}
    assert all(isinstance(v, int) and v > 0 for v in stats.values())
    assert stats["peak_allocated"] >= stats["allocated"]


@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK), reason="peak RSS cannot be reset here")
def test_cpu_reset_peak_memory():
    device = CpuDevice()
    big = torch.ones(32 * 2**20)  # 128 MiB, touched
    before = device.memory_stats()["peak_allocated"]
    del big
    device.reset_peak_memory()
    assert device.memory_stats()["peak_allocated"] < before - 64 * 2**20


def test_cpu_facts():
    device = CpuDevice()
    assert device.torch_device(5) == torch.device("cpu") and device.device_count() == 1
    device.set_current(5)
    device.synchronize()
    assert device.name() and device.name() != ""
    assert all(device.supports_dtype(d) for d in (torch.float32, torch.float64, torch.bfloat16, torch.float16))
    assert device.autocast_dtype() == torch.bfloat16
    assert device.fused_adamw()  # torch 2.13 has a fused AdamW kernel for the CPU


def test_package_exports():
    assert set(device_pkg.__all__) == {"Device", "DeviceError", "available_devices", "get_device"}
    assert issubclass(DeviceError, RuntimeError)
