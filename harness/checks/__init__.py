"""What a run checks: cases, parity (prefill/decode), greedy, MTP, slopes, golden runs, the gate."""
