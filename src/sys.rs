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

/// Memory available to this process: the smallest cgroup memory limit over its cgroup and
/// that cgroup's ancestors (v2 `memory.max` or v1 `memory.limit_in_bytes`), else physical
/// memory (8 GiB if neither can be read).
pub fn available_memory() -> u64 {
    let proc_cgroup = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    let read = |p: &str| std::fs::read_to_string(p).ok();
    let cgroup = cgroup_limit(&proc_cgroup, &read, Controller::Memory);
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

/// A resource a cgroup limits.
#[derive(Clone, Copy)]
enum Controller {
    /// Bytes of memory.
    Memory,
    /// Whole cores (a CPU quota, rounded up).
    Cpu,
}

/// The tightest `controller` limit over this process's cgroup and its ancestors, from the
/// text of `/proc/self/cgroup` and a file reader. Both cgroup versions: v2 (`0::/path`, files
/// `memory.max` and `cpu.max` under `/sys/fs/cgroup/path`) and v1 (`N:memory:/path` under
/// `/sys/fs/cgroup/memory/`, `N:cpu,cpuacct:/path` under `/sys/fs/cgroup/cpu/`). A container
/// usually sees its own cgroup mounted at the root while `/proc/self/cgroup` shows a longer
/// path, so the root of the mount is always read too; paths that do not exist are skipped.
fn cgroup_limit(
    proc_cgroup: &str,
    read: &dyn Fn(&str) -> Option<String>,
    controller: Controller,
) -> Option<u64> {
    let mut best: Option<u64> = None;
    let mut take = |v: Option<u64>| {
        if let Some(v) = v {
            best = Some(best.map_or(v, |b| b.min(v)));
        }
    };
    for line in proc_cgroup.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(_id), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        let v1 = match controller {
            Controller::Memory => "memory",
            Controller::Cpu => "cpu",
        };
        let (root, files): (String, &[&str]) = if controllers.is_empty() {
            (
                "/sys/fs/cgroup".into(),
                match controller {
                    Controller::Memory => &["memory.max"],
                    Controller::Cpu => &["cpu.max"],
                },
            )
        } else if controllers.split(',').any(|c| c == v1) {
            (
                format!("/sys/fs/cgroup/{controllers}"),
                match controller {
                    Controller::Memory => &["memory.limit_in_bytes"],
                    Controller::Cpu => &["cpu.cfs_quota_us", "cpu.cfs_period_us"],
                },
            )
        } else {
            continue;
        };
        // The cgroup itself, each ancestor, and the mount's root.
        let mut dirs: Vec<String> = Vec::new();
        let mut p = path.trim_end_matches('/').to_string();
        while !p.is_empty() {
            dirs.push(format!("{root}{p}"));
            p.truncate(p.rfind('/').unwrap_or(0));
        }
        dirs.push(root.clone());
        for dir in dirs {
            let file = |name: &str| read(&format!("{dir}/{name}"));
            take(match (controller, files) {
                (Controller::Memory, [name]) => file(name).and_then(|s| s.trim().parse().ok()),
                (Controller::Cpu, [name]) => file(name).and_then(|s| cpu_quota(&s)),
                (Controller::Cpu, [quota, period]) => match (file(quota), file(period)) {
                    (Some(q), Some(p)) => cpu_quota(&format!("{} {}", q.trim(), p.trim())),
                    _ => None,
                },
                _ => None,
            });
        }
    }
    best
}

/// The cores this process may use: its CPU affinity mask, limited by the cgroup CPU quota
/// (v2 `cpu.max` or v1 `cpu.cfs_quota_us`, rounded up), at least 1.
pub fn usable_cores() -> usize {
    let affinity = rustix::thread::sched_getaffinity(None)
        .map(|s| s.count() as usize)
        .ok()
        .filter(|n| *n > 0)
        .or_else(|| std::thread::available_parallelism().ok().map(|n| n.get()))
        .unwrap_or(1);
    let proc_cgroup = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    let read = |p: &str| std::fs::read_to_string(p).ok();
    let quota = cgroup_limit(&proc_cgroup, &read, Controller::Cpu);
    quota
        .map_or(affinity, |q| (q as usize).min(affinity))
        .max(1)
}

/// Cores a CPU quota "QUOTA PERIOD" allows, rounded up: a cgroup v2 `cpu.max` ("max PERIOD"
/// when unlimited) or v1's two files joined (quota -1 when unlimited).
fn cpu_quota(cpu_max: &str) -> Option<u64> {
    let mut it = cpu_max.split_whitespace();
    let quota: u64 = it.next()?.parse().ok()?;
    let period: u64 = it.next()?.parse().ok().filter(|p| *p > 0)?;
    Some(quota.div_ceil(period))
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
        assert_eq!(super::cpu_quota("-1 100000"), None);
    }

    fn files(entries: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: std::collections::HashMap<String, String> = entries
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |p: &str| map.get(p).cloned()
    }

    #[test]
    fn cgroup_v1_memory_limit_is_read_in_a_container_and_on_a_host() {
        use super::{cgroup_limit, Controller::*};
        let proc = "4:memory:/kubepods/pod1/abc\n3:cpu,cpuacct:/kubepods/pod1/abc\n0::/\n";
        // In a container: its own cgroup mounted at the root of the hierarchy.
        let inside = files(&[
            (
                "/sys/fs/cgroup/memory/memory.limit_in_bytes",
                "10737418240\n",
            ),
            ("/sys/fs/cgroup/cpu,cpuacct/cpu.cfs_quota_us", "150000\n"),
            ("/sys/fs/cgroup/cpu,cpuacct/cpu.cfs_period_us", "100000\n"),
        ]);
        assert_eq!(cgroup_limit(proc, &inside, Memory), Some(10 << 30));
        assert_eq!(cgroup_limit(proc, &inside, Cpu), Some(2));
        // On the host: the full path, with a tighter limit on an ancestor; v1 "unlimited" is a
        // huge number and the quota -1.
        let host = files(&[
            (
                "/sys/fs/cgroup/memory/kubepods/pod1/abc/memory.limit_in_bytes",
                "9223372036854771712",
            ),
            (
                "/sys/fs/cgroup/memory/kubepods/pod1/memory.limit_in_bytes",
                "4294967296",
            ),
            (
                "/sys/fs/cgroup/memory/memory.limit_in_bytes",
                "9223372036854771712",
            ),
            (
                "/sys/fs/cgroup/cpu,cpuacct/kubepods/pod1/abc/cpu.cfs_quota_us",
                "-1",
            ),
            (
                "/sys/fs/cgroup/cpu,cpuacct/kubepods/pod1/abc/cpu.cfs_period_us",
                "100000",
            ),
        ]);
        assert_eq!(cgroup_limit(proc, &host, Memory), Some(4 << 30));
        assert_eq!(cgroup_limit(proc, &host, Cpu), None);
    }

    #[test]
    fn cgroup_v2_limits_are_the_tightest_over_ancestors() {
        use super::{cgroup_limit, Controller::*};
        let proc = "0::/system.slice/pmad.service\n";
        let fs = files(&[
            (
                "/sys/fs/cgroup/system.slice/pmad.service/memory.max",
                "max\n",
            ),
            ("/sys/fs/cgroup/system.slice/memory.max", "2147483648\n"),
            (
                "/sys/fs/cgroup/system.slice/pmad.service/cpu.max",
                "50000 100000\n",
            ),
        ]);
        assert_eq!(cgroup_limit(proc, &fs, Memory), Some(2 << 30));
        assert_eq!(cgroup_limit(proc, &fs, Cpu), Some(1));
        // A container with a cgroup namespace: "0::/" and the files at the root.
        let fs = files(&[("/sys/fs/cgroup/memory.max", "536870912\n")]);
        assert_eq!(cgroup_limit("0::/\n", &fs, Memory), Some(512 << 20));
        assert_eq!(cgroup_limit("", &fs, Memory), None);
    }

    #[test]
    fn lowering_the_priority_of_a_thread_works_unprivileged() {
        // In a thread of its own: the policy and nice value stay with that thread.
        let failed = std::thread::spawn(super::lower_priority).join().unwrap();
        assert!(failed.is_empty(), "{failed:?}");
    }
}
