"""Fast tests: pure cores and in-process tests; no subprocess, ffmpeg, ClamAV, loop devices,
Unix users or daemons (`make test-fast`)."""
