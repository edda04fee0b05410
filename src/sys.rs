//! Facts about the machine pmad runs on, asked of the system rather than assumed.
//!
//! The page size differs between machines (4 KiB on x86-64, 16 or 64 KiB on some arm64
//! kernels): everything that rounds to pages (`madvise` ranges, the SIGBUS handler's page
//! replacement, RSS from `/proc/self/statm`) uses [`page_size`]. The cores pmad may use are
//! those of its affinity mask, limited by its cgroup's CPU quota ([`usable_cores`]); a
//! sidecar lowers its own CPU and I/O priority below the trainer's ([`lower_priority`]).

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

/// The cores this process may use: its CPU affinity mask, limited by the cgroup v2 quota
/// (`cpu.max`, rounded up), at least 1.
pub fn usable_cores() -> usize {
    let affinity = rustix::thread::sched_getaffinity(None)
        .map(|s| s.count() as usize)
        .ok()
        .filter(|n| *n > 0)
        .or_else(|| std::thread::available_parallelism().ok().map(|n| n.get()))
        .unwrap_or(1);
    let quota = std::fs::read_to_string("/sys/fs/cgroup/cpu.max")
        .ok()
        .and_then(|s| cpu_quota(&s));
    quota.map_or(affinity, |q| q.min(affinity)).max(1)
}

/// Cores a cgroup v2 `cpu.max` ("QUOTA PERIOD", or "max PERIOD") allows, rounded up.
fn cpu_quota(cpu_max: &str) -> Option<usize> {
    let mut it = cpu_max.split_whitespace();
    let quota: u64 = it.next()?.parse().ok()?;
    let period: u64 = it.next()?.parse().ok().filter(|p| *p > 0)?;
    Some(quota.div_ceil(period) as usize)
}

/// Nice value of a background pmad (the trainer usually runs at 0).
pub const BACKGROUND_NICE: i32 = 10;
/// Best-effort I/O priority level of a background pmad (0 = highest, 7 = lowest).
pub const BACKGROUND_IO_LEVEL: u32 = 7;

/// Lower this thread's CPU and I/O priority below a normal process's: nice
/// [`BACKGROUND_NICE`], the `SCHED_BATCH` policy (the scheduler treats it as CPU-bound work
/// and does not let it preempt interactive threads), and the lowest best-effort I/O
/// priority. Threads started afterwards inherit all three, so call it before starting any.
/// Returns what could not be applied, for the log.
pub fn lower_priority() -> Vec<String> {
    let mut failed = Vec::new();
    if let Err(e) = rustix::process::setpriority_process(None, BACKGROUND_NICE) {
        failed.push(format!("nice {BACKGROUND_NICE}: {e}"));
    }
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: sched_setscheduler reads the sched_param we pass by reference (valid for the
    // call) and changes only this thread's scheduling policy.
    if unsafe { libc::sched_setscheduler(0, libc::SCHED_BATCH, &param) } != 0 {
        failed.push(format!("SCHED_BATCH: {}", std::io::Error::last_os_error()));
    }
    // ioprio_set(IOPRIO_WHO_PROCESS = 1, 0 = this thread, class BE (2) << 13 | level).
    let ioprio = (2u32 << 13) | BACKGROUND_IO_LEVEL;
    // SAFETY: a plain system call with integer arguments only; it changes this thread's I/O
    // priority and touches no memory.
    if unsafe { libc::syscall(libc::SYS_ioprio_set, 1, 0, ioprio) } != 0 {
        failed.push(format!("I/O priority: {}", std::io::Error::last_os_error()));
    }
    failed
}

#[cfg(test)]
mod tests {
    #[test]
    fn page_size_is_a_power_of_two() {
        let p = super::page_size();
        assert!(p >= 4096 && p.is_power_of_two(), "{p}");
        assert!(super::clock_ticks_per_second() > 0);
        assert!(super::available_memory() > 0);
        assert!(super::usable_cores() >= 1);
    }

    #[test]
    fn cgroup_quota_is_rounded_up_to_whole_cores() {
        assert_eq!(super::cpu_quota("max 100000\n"), None);
        assert_eq!(super::cpu_quota("150000 100000\n"), Some(2));
        assert_eq!(super::cpu_quota("50000 100000"), Some(1));
        assert_eq!(super::cpu_quota("400000 100000"), Some(4));
        assert_eq!(super::cpu_quota("garbage"), None);
    }

    #[test]
    fn lowering_the_priority_of_a_thread_works_unprivileged() {
        // In a thread of its own: the policy and nice value stay with that thread.
        let failed = std::thread::spawn(super::lower_priority).join().unwrap();
        assert!(failed.is_empty(), "{failed:?}");
    }
}
