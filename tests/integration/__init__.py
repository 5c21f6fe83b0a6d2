"""Tests with real dependencies: processes, ffmpeg, ClamAV, loop devices, Unix users, daemons."""
