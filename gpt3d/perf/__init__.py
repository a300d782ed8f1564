"""Performance accounting: FLOP counts (flops), throughput and MFU of a measured step (throughput), and the
`gpt3d bench` measurements (bench)."""
