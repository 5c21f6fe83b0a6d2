"""The test suite: tests/unit (pure cores and in-process tests, fast) and tests/integration
(real processes, ffmpeg, ClamAV, loop devices, Unix users, daemons). Shared fixtures and
helpers live in tests/fixtures."""
