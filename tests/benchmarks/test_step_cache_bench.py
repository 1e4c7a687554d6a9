"""benchmarks/step_cache.py runs (tiny shapes, CPU) and its speed table reports the cache's savings."""

import re

from benchmarks import step_cache


def test_speed_section_reports_saved_fraction_and_time_ratio(capsys):
    assert step_cache.main(["speed", "--preset", "tiny", "--resolution", "32", "--repeats", "1", "--threads", "1",
                            "--specs", "fbcache:10", "fbcache:0"]) == 0
    rows = {line.split(" | ")[0].strip("| "): line for line in capsys.readouterr().out.splitlines()
            if line.startswith("| fbcache")}
    forced = rows["fbcache:10,first=1,warmup=4,tail=2,max_skip=3"]
    never = rows["fbcache:0,first=1,warmup=4,tail=2,max_skip=3"]
    assert float(re.findall(r"([\d.]+)%", forced)[0]) > 25  # warm-up, tail and max_skip leave ~3/4 of the steps
    assert "| 0.0% |" in never
