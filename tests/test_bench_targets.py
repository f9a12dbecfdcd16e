"""tools/bench.py's summary of the issue-17 speed targets: each figure read from its area's results."""

from __future__ import annotations

from conftest import import_tool


def _bench():
    return import_tool("bench")


def test_targets_read_each_area_and_say_whether_met() -> None:
    results = {"areas": {
        "import": {"small_vs_floor_median": 0.85, "small_rss_with_helpers_peak_mb": 160.0,
                   "big_import_vs_ceiling_median": 0.81, "medium_vs_big_median": 0.9},
        "image": {"mkimage_best_s": 0.3, "mkimage_plain_dump": {"ratio_median_paired": 0.7},
                  "dump_command": {"ratio_median_paired": 1.6}},
        "flatten": {"flatten": {"store_top_layer_only": {"store_flatten_top_layer_new_process_s": 0.14}}},
        "mount": {"cli": {"python -m flatmount: mount": {"over_floor_ms": 12.0},
                          "python -m flatmount: umount": {"over_floor_ms": 16.0}}},
    }}
    met = {k: v["met"] for k, v in _bench().targets(results).items()}
    assert met == {
        "1_small_files_vs_tar_x_sync": True, "1_small_files_rss_mb": False,
        "2_big_import_vs_min_sha256_disk": True, "2_medium_vs_big": False,
        "3_mkimage_vs_mkcomposefs": True, "3_mkimage_gz_dump_wall_s": True, "3_dump_vs_composefs_info": False,
        "4_flatten_top_layer_new_process_s": True,
        "5_cli_mount_over_python_ms": True, "5_cli_umount_over_python_ms": False,
    }


def test_targets_of_areas_that_did_not_run_are_unknown() -> None:
    summary = _bench().targets({"areas": {"image": {"mkimage_best_s": 0.5}}})
    assert summary["3_mkimage_gz_dump_wall_s"]["met"] is False
    assert all(v["met"] is None for k, v in summary.items() if k != "3_mkimage_gz_dump_wall_s")
