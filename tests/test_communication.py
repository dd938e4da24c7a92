"""benchmarks/communication.py: counting the bytes of collectives in partitioned HLO text."""

import importlib.util
import pathlib
import sys

_PATH = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "communication.py"
_SPEC = importlib.util.spec_from_file_location("communication", _PATH)
communication = importlib.util.module_from_spec(_SPEC)
sys.modules["communication"] = communication
_SPEC.loader.exec_module(communication)

_HLO = """
  %p = f32[64,3]{1,0} parameter(0)
  %all-reduce.1 = f32[64,3]{1,0} all-reduce(f32[64,3]{1,0} %p), replica_groups={{0,1,2,3}}, to_apply=%add
  %all-reduce.2 = (f32[10]{0}, bf16[2,2]{1,0}) all-reduce(f32[10]{0} %a, bf16[2,2]{1,0} %b), to_apply=%add
  %all-gather.3 = s32[16]{0} all-gather(s32[4]{0} %c), dimensions={0}
  %all-gather-done.3 = s32[16]{0} all-gather-done(%s)
  %add.4 = f32[64,3]{1,0} add(f32[64,3]{1,0} %all-reduce.1, f32[64,3]{1,0} %p)
"""


def test_collective_bytes_counts_each_collective_once():
  ops = communication.collective_bytes(_HLO)
  assert ops["all-reduce"] == (2, 64 * 3 * 4 + 10 * 4 + 2 * 2 * 2)
  assert ops["all-gather"] == (1, 16 * 4)          # the -done half is not a second collective
  assert set(ops) == {"all-reduce", "all-gather"}  # the add reading an all-reduce is not one


def test_largest_collectives_are_sorted_by_size():
  largest = communication.largest_collectives(_HLO, count=2)
  assert [size for size, _ in largest] == [768, 64]
  assert largest[0][1].startswith("all-reduce f32[64,3]")


def test_traffic_per_device():
  ops = {"all-reduce": (2, 800), "all-gather": (1, 400), "all-to-all": (1, 400)}
  # Ring all-reduce 2(N-1)/N·V; gathers and all-to-alls (N-1)/N of their result.
  assert communication.traffic(ops, 4) == 2 * 3 / 4 * 800 + 3 / 4 * 400 + 3 / 4 * 400
  assert communication.traffic({}, 4) == 0
