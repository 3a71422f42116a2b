"""sdlite.memory: weights at rest (materialised into one scratch buffer, freed with their
network), large convolutions in slices, and set_malloc_policy and trim_heap (what they ask of
glibc, checked with a recording stand-in)."""

import gc
import threading
import weakref

import pytest
import torch
from torch import nn

from sdlite import memory
from sdlite.layers import Conv2d
from sdlite.palettize import palettize


class FirstRow(nn.Module):
    """Reads its embedding child's weight directly (as CLIP reads its position embedding)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 64)

    def forward(self):
        return self.embed.weight[0]


class Scaled(nn.Module):
    """A module with a weight of its own that runs a child with another: nested weights at rest."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(64, 64))
        self.child = nn.Linear(64, 64)
        self.first_row = FirstRow()

    def forward(self, x):
        return self.child(x) @ self.weight + self.first_row()  # the parent's weight used after the child ran


def at_rest_copy(network: nn.Module, packed: bool) -> nn.Module:
    copy = Scaled()
    copy.load_state_dict(network.state_dict())
    copy.half()
    if not packed:
        return memory.keep_at_rest(copy, torch.float32)
    weight = palettize(network.child.weight.detach(), 8)
    del copy.child._parameters["weight"]
    return memory.keep_at_rest(copy, torch.float32, {"child.weight": weight})


@pytest.mark.parametrize("packed", [False, True])
def test_nested_weights_at_rest_share_one_scratch_buffer_without_overlap(packed):
    torch.manual_seed(0)
    reference = Scaled()
    network = at_rest_copy(reference, packed)
    x = torch.randn(3, 64)
    with torch.no_grad():
        expected = reference(x)
        got, again = network(x), network(x)
    tolerance = 0.05 if packed else 2e-3  # fp16 weights; 8-bit LUT for the child's weight
    assert torch.allclose(got, expected, atol=tolerance * expected.abs().max()), (got - expected).abs().max()
    assert torch.equal(got, again)
    assert network.weight is None and network.child.weight is None  # dropped after the call


def test_a_network_with_weights_at_rest_is_freed_without_the_garbage_collector():
    """Low-memory mode frees its text encoder by dropping the last reference; a reference cycle
    through the hooks would keep its weights until Python's next garbage collection."""
    network = at_rest_copy(Scaled(), packed=True)
    gone = weakref.ref(network)
    gc.disable()
    try:
        del network
        assert gone() is None
    finally:
        gc.enable()


def test_threads_sharing_a_network_with_weights_at_rest_each_get_their_own_result():
    """The server's workers run one model from several threads, and the network's modules share
    one scratch buffer: one thread's weights must not land under another's matmul."""
    torch.manual_seed(0)
    network = memory.keep_at_rest(nn.Sequential(*[nn.Linear(256, 256) for _ in range(6)]).half(), torch.float32)
    inputs = [torch.randn(64, 256) for _ in range(4)]
    with torch.no_grad():
        expected = [network(x) for x in inputs]
    wrong = []

    def work(i: int) -> None:
        with torch.no_grad():
            for _ in range(30):
                if not torch.equal(network(inputs[i]), expected[i]):
                    wrong.append(i)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not wrong


def test_a_failing_call_leaves_the_network_usable_from_another_thread():
    network = memory.keep_at_rest(nn.Sequential(nn.Linear(8, 8)).half(), torch.float32)
    with pytest.raises(RuntimeError):
        network(torch.randn(2, 9))  # wrong width: fails inside the layer
    other = threading.Thread(target=lambda: network(torch.randn(2, 8)))
    other.start()
    other.join(timeout=10)
    assert not other.is_alive()  # the lock was released
    assert network[0].weight is None


def test_a_large_palettized_convolution_runs_in_slices_of_output_channels(monkeypatch):
    """Its slices take the scratch buffer in turn (so the buffer is one slice long) and give the
    whole convolution's output."""
    monkeypatch.setattr(memory, "SLICE_VALUES", 5000)
    torch.manual_seed(0)
    conv = Conv2d(16, 64, 3, padding=1)  # 9,216 weight values: slices of 34 output channels
    weight = palettize(conv.weight.detach(), 8)
    at_rest = Conv2d(16, 64, 3, padding=1)
    at_rest.load_state_dict(conv.state_dict())
    del at_rest._parameters["weight"]
    memory.keep_at_rest(at_rest, torch.float32, {"weight": weight})
    parts = []
    iterate = memory.Slices.__iter__
    monkeypatch.setattr(memory.Slices, "__iter__", lambda self: (parts.append((*p[:2], p[2].data_ptr())) or p
                                                                   for p in iterate(self)))
    x = torch.randn(2, 16, 8, 8)
    with torch.no_grad():
        conv.weight.copy_(weight.unpack())
        expected, got = conv(x), at_rest(x)
    assert [part[:2] for part in parts] == [(0, 34), (34, 64)]
    assert parts[0][2] == parts[1][2]  # one buffer
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-5 * expected.abs().max())
    assert at_rest.weight is None


class FakeLibc:
    def __init__(self, max_mmap_threshold: int = 1 << 40):
        self.max_mmap_threshold = max_mmap_threshold
        self.settings = {}
        self.trims = 0

    def malloc_trim(self, pad: int) -> int:
        self.trims += 1
        return 1

    def mallopt(self, parameter: int, value: int) -> int:
        if parameter == memory.M_MMAP_THRESHOLD and value > self.max_mmap_threshold:
            return 0  # glibc refuses it and keeps the old value
        self.settings[parameter] = value
        return 1


@pytest.fixture
def libc(monkeypatch):
    fake = FakeLibc()
    monkeypatch.setattr(memory, "c_library", lambda: fake)
    return fake


def test_freed_blocks_up_to_256_mib_are_kept(libc):
    memory.set_malloc_policy()
    assert libc.settings == {memory.M_MMAP_THRESHOLD: 256 << 20, memory.M_TRIM_THRESHOLD: 1 << 30}


def test_a_glibc_that_refuses_large_thresholds_gets_32_mib(libc):
    libc.max_mmap_threshold = 32 << 20
    memory.set_malloc_policy()
    assert libc.settings[memory.M_MMAP_THRESHOLD] == 32 << 20


def test_a_network_loaded_on_demand_gives_the_heap_back_before_and_after(libc):
    trims = []
    on_demand = memory.OnDemand(lambda: trims.append(libc.trims) or nn.Linear(2, 2), None, torch.float32)
    with memory.using(on_demand) as network:
        assert isinstance(network, nn.Linear)
    assert trims == [1] and libc.trims == 2


def test_without_glibc_nothing_happens(monkeypatch):
    monkeypatch.setattr(memory, "c_library", lambda: None)
    memory.set_malloc_policy()  # no error
    memory.trim_heap()


def resident_mib() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 1024
    pytest.skip("no VmRSS in /proc/self/status")


@pytest.mark.skipif(memory.c_library() is None, reason="madvise needs Linux")
def test_release_weights_drops_mapped_pages_and_keeps_every_value(tmp_path):
    """Unmodified memory-mapped weights leave resident memory and read back the same; a weight
    modified in place, or one that is not file-backed, is left alone (DONTNEED would undo it)."""
    from safetensors.torch import save_file

    from sdlite.loading import read_safetensors

    values = torch.arange(16 << 20, dtype=torch.float32)  # 64 MiB
    save_file({"mapped": values, "modified": values[:1 << 20].clone()}, str(tmp_path / "w.safetensors"))
    weights = read_safetensors(tmp_path / "w.safetensors")
    network = nn.Module()
    for name, tensor in weights.items():
        network.register_parameter(name, nn.Parameter(tensor, requires_grad=False))
    network.register_buffer("made", torch.ones(1 << 20))
    with torch.no_grad():
        network.modified.add_(1)
    assert torch.equal(network.mapped, values)  # every page resident now
    before = resident_mib()
    memory.release_weights(network)
    assert before - resident_mib() > 48
    assert torch.equal(network.mapped, values)  # read back from the file
    assert torch.equal(network.modified, values[:1 << 20] + 1) and torch.equal(network.made, torch.ones(1 << 20))


@pytest.mark.skipif(memory.c_library() is None, reason="madvise needs Linux")
def test_the_files_sdlite_maps_are_known_and_others_found_in_the_process_maps(tmp_path, monkeypatch):
    """`release_pages` releases views of the files sdlite maps (`note_file_mapping`) without
    reading /proc/self/maps, and other file-backed views (torch.load's .ckpt mappings; `.data`
    has a version counter of its own, as in `keep_at_rest`) by reading it; a mapping's range is
    forgotten with the mapping."""
    from safetensors.torch import save_file

    from sdlite.loading import read_safetensors

    values = torch.arange(16 << 20, dtype=torch.float32)  # 64 MiB
    save_file({"weight": values}, str(tmp_path / "w.safetensors"))
    torch.save({"weight": values}, tmp_path / "w.ckpt")
    mapped = read_safetensors(tmp_path / "w.safetensors")["weight"]
    loaded = torch.load(tmp_path / "w.ckpt", mmap=True, weights_only=True)["weight"].data
    assert torch.equal(mapped, values) and torch.equal(loaded, values)  # every page resident now
    reads, read_maps = [], memory.file_mappings
    monkeypatch.setattr(memory, "file_mappings", lambda: reads.append(1) or read_maps())
    before = resident_mib()
    memory.release_pages([mapped])
    assert before - resident_mib() > 48 and not reads
    before = resident_mib()
    memory.release_pages([loaded])
    assert before - resident_mib() > 48 and reads == [1]
    assert torch.equal(mapped, values) and torch.equal(loaded, values)  # read back from the files
    address = mapped.data_ptr()
    del mapped
    gc.collect()
    assert not any(lo <= address < hi for _, lo, hi in memory._mapped_files.values())


@pytest.mark.skipif(memory.c_library() is None, reason="madvise needs Linux")
def test_a_mapping_being_freed_is_no_longer_trusted(monkeypatch):
    """Between a mapping's unmapping and the removal of its entry, its range may hold other memory:
    an entry whose mapping is gone, or closed, releases nothing."""
    import mmap

    values = torch.arange(1 << 20, dtype=torch.float32) + 7  # anonymous, never changed in place
    assert values._version == 0
    start, end = memory.page_range(values)
    closed = mmap.mmap(-1, 4096)
    closed.close()
    for stale in (lambda: None, lambda: closed):
        monkeypatch.setitem(memory._mapped_files, -1, (stale, start, end))
        memory.release_pages([values])
        assert torch.equal(values, torch.arange(1 << 20, dtype=torch.float32) + 7)


@pytest.mark.skipif(memory.c_library() is None, reason="madvise needs Linux")
def test_release_weights_covers_weights_kept_at_rest(tmp_path):
    from safetensors.torch import save_file

    from sdlite.loading import read_safetensors

    values = torch.arange(32 << 20, dtype=torch.float16)  # 64 MiB in fp16, kept at rest for fp32 compute
    save_file({"weight": values}, str(tmp_path / "w.safetensors"))
    network = nn.Linear(1, 1, bias=False)
    network.weight = nn.Parameter(read_safetensors(tmp_path / "w.safetensors")["weight"], requires_grad=False)
    memory.keep_at_rest(network, torch.float32)
    assert torch.equal(network.stored_tensors[0], values)
    before = resident_mib()
    memory.release_weights(network)
    assert before - resident_mib() > 48
    assert torch.equal(network.stored_tensors[0], values)
