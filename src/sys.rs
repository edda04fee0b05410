//! Facts about the machine pmad runs on, asked of the system rather than assumed.
//!
//! The page size differs between machines (4 KiB on x86-64, 16 or 64 KiB on some arm64
//! kernels): everything that rounds to pages (`madvise` ranges, the SIGBUS handler's page
//! replacement, RSS from `/proc/self/statm`) uses [`page_size`].

/// The system's memory page size in bytes.
pub fn page_size() -> usize {
    rustix::param::page_size()
}

/// Clock ticks per second (`USER_HZ`), the unit of CPU times in `/proc/self/stat`.
pub fn clock_ticks_per_second() -> u64 {
    rustix::param::clock_ticks_per_second()
}

/// Memory available to this process: the cgroup (v2) limit if one is set, else physical
/// memory (8 GiB if neither can be read).
pub fn available_memory() -> u64 {
    let cgroup = std::fs::read_to_string("/sys/fs/cgroup/memory.max")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok());
    let total = std::fs::read_to_string("/proc/meminfo").ok().and_then(|s| {
        s.lines()
            .find(|l| l.starts_with("MemTotal:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<u64>().ok())
            .map(|kb| kb * 1024)
    });
    match (cgroup, total) {
        (Some(c), Some(t)) => c.min(t),
        (Some(c), None) => c,
        (None, Some(t)) => t,
        (None, None) => 8 << 30,
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn page_size_is_a_power_of_two() {
        let p = super::page_size();
        assert!(p >= 4096 && p.is_power_of_two(), "{p}");
        assert!(super::clock_ticks_per_second() > 0);
        assert!(super::available_memory() > 0);
    }
}
