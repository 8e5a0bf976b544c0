//! NVIDIA GPUs of this host, as the driver lists them, and what a jailed process given some of them is granted.
//!
//! The driver lists each GPU as `/proc/driver/nvidia/gpus/<PCI bus id>/information` (its `Device Minor`, `GPU UUID`
//! and `Model`); the GPU's device node is `/dev/nvidia<minor>`. Besides its own nodes, a process that uses a GPU
//! needs the driver's control devices: `/dev/nvidiactl`, `/dev/nvidia-uvm` and `/dev/nvidia-uvm-tools` (unified
//! memory: CUDA opens both at `cuInit`), and `/dev/nvidia-modeset` and `/dev/nvidia-caps/` (MIG capabilities) where
//! the host has them.
//!
//! A jailed process given GPUs is granted ([`GpuGrant`]), beyond the jail's fixed set:
//! * read-write, at their real paths: the device nodes of its own GPUs and the control devices above that exist;
//!   never another GPU's node;
//! * read-only, in place of the host's `/proc/driver/nvidia`: the driver's `version`, `registry` and `params` (with
//!   `ModifyDeviceFiles: 0` where the server could write that copy, so the driver's library never tries to create
//!   the nodes it was not given), and the `gpus/<bus id>` entries of its own GPUs only. This is the view NVIDIA's
//!   container toolkit gives a container;
//! * read-only: the host's CPU and NUMA topology (`/sys/devices/system`), its PCI device tree
//!   (`/sys/bus/pci/devices` and the `/sys/devices/pci*` it links to) and the driver modules' parameters
//!   (`/sys/module/nvidia*`), which CUDA reads for memory placement; the jail has no other `/sys`;
//! * the directory of `libcuda.so.1` where the server itself finds it through `LD_LIBRARY_PATH` (a driver installed
//!   outside the system's library dirs, as in some GPU images), read-only and named in the process's
//!   `LD_LIBRARY_PATH`; a driver installed in the system's library dirs is visible with `/usr` already;
//! * in its device cgroup (cgroup v1's `devices` controller, where it is mounted): those character devices alone,
//!   besides the jail's own `/dev` ([`crate::JAIL_DEVICES`]).
//!
//! Whole GPUs only: MIG instances are not assigned separately.

use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

/// The control devices a CUDA process opens besides its GPUs' own nodes, where the host has them.
const CONTROL_DEVICES: &[&str] = &["nvidiactl", "nvidia-uvm", "nvidia-uvm-tools", "nvidia-modeset"];
/// The driver's files under `/proc/driver/nvidia` that every GPU process may read (besides its GPUs' entries).
const DRIVER_FILES: &[&str] = &["version", "registry", "params"];

/// One NVIDIA GPU of this host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NvidiaGpu {
    /// Its PCI bus id as the driver names its `/proc` entry (`0000:18:00.0`).
    pub bus_id: String,
    /// The minor number of its device node, `/dev/nvidia<minor>`.
    pub minor: u32,
    /// `GPU-…`, where the driver knows it (it shows `GPU-????…` for a GPU it has not initialised yet).
    pub uuid: Option<String>,
    pub model: String,
}

/// A character device, as a device cgroup names it: `c <major>:<minor>`, `*` for any minor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CharDevice {
    pub major: u32,
    pub minor: Option<u32>,
}

impl std::fmt::Display for CharDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.minor {
            Some(minor) => write!(f, "c {}:{minor}", self.major),
            None => write!(f, "c {}:*", self.major),
        }
    }
}

/// What a jailed process given some GPUs is granted (see the module doc); [`crate::Grants::gpus`] applies it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GpuGrant {
    /// Device nodes bound read-write at their real paths (a directory for `/dev/nvidia-caps`).
    pub devices: Vec<PathBuf>,
    /// `(host path, path in the jail)`: shown read-only in an otherwise empty `/proc/driver/nvidia`.
    pub driver_proc: Vec<(PathBuf, PathBuf)>,
    /// Visible read-only at their real paths: the `/sys` entries CUDA reads, and the driver's library dir where it
    /// is outside the system's.
    pub read_only: Vec<PathBuf>,
    /// `LD_LIBRARY_PATH` for the process, where the driver's library is found only through the server's own.
    pub library_path: Option<PathBuf>,
    /// The character devices of `devices`, which the device cgroup allows besides the jail's own `/dev`.
    pub char_devices: Vec<CharDevice>,
}

/// The NVIDIA GPUs of this host, in PCI bus order: the order CUDA numbers them in under
/// `CUDA_DEVICE_ORDER=PCI_BUS_ID`.
#[derive(Debug, Clone)]
pub struct NvidiaGpus {
    gpus: Vec<NvidiaGpu>,
    /// `/proc/driver/nvidia`, `/dev` and `/sys` (a fake tree in tests).
    driver: PathBuf,
    dev: PathBuf,
    sys: PathBuf,
    /// A copy of the driver's `params` with `ModifyDeviceFiles: 0`, shown to jailed processes in place of it.
    params: Option<PathBuf>,
    /// The directory of `libcuda.so.1`, where only `LD_LIBRARY_PATH` finds it.
    library_dir: Option<PathBuf>,
}

impl NvidiaGpus {
    /// The GPUs the driver lists; none where there is no NVIDIA driver.
    pub fn discover() -> Self {
        let mut gpus = Self::discover_at(Path::new("/proc/driver/nvidia"), Path::new("/dev"), Path::new("/sys"));
        gpus.library_dir = library_dir_from(std::env::var_os("LD_LIBRARY_PATH"));
        gpus
    }

    /// The GPUs listed under `driver` (the driver's `/proc/driver/nvidia`), with device nodes in `dev` and sysfs in
    /// `sys`: a fake tree, in tests.
    pub fn discover_at(driver: &Path, dev: &Path, sys: &Path) -> Self {
        let mut gpus: Vec<NvidiaGpu> = std::fs::read_dir(driver.join("gpus"))
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|entry| {
                let bus_id = entry.file_name().to_str()?.to_ascii_lowercase();
                let text = std::fs::read_to_string(entry.path().join("information")).ok()?;
                parse_information(&bus_id, &text)
            })
            .collect();
        // Bus ids are fixed-width hex (`dddd:bb:dd.f`), so their text order is the bus order.
        gpus.sort_by(|a, b| a.bus_id.cmp(&b.bus_id));
        Self {
            gpus,
            driver: driver.to_path_buf(),
            dev: dev.to_path_buf(),
            sys: sys.to_path_buf(),
            params: None,
            library_dir: None,
        }
    }

    pub fn gpus(&self) -> &[NvidiaGpu] {
        &self.gpus
    }

    pub fn len(&self) -> usize {
        self.gpus.len()
    }

    pub fn is_empty(&self) -> bool {
        self.gpus.is_empty()
    }

    /// Writes `<run_dir>/nvidia-params`: the driver's `params` with `ModifyDeviceFiles: 0`, which jailed processes
    /// see in its place. Without it they see the driver's own (its library then tries, and fails, to create the
    /// device nodes a jail leaves out). Call once, before jailing GPU processes.
    pub fn prepare_for_jail(&mut self, run_dir: &Path) -> std::io::Result<()> {
        if self.gpus.is_empty() {
            return Ok(());
        }
        let params = std::fs::read_to_string(self.driver.join("params"))?;
        let Some(masked) = masked_params(&params) else { return Ok(()) };
        std::fs::create_dir_all(run_dir)?;
        let path = run_dir.join("nvidia-params");
        std::fs::write(&path, masked)?;
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o444))?;
        self.params = Some(path);
        Ok(())
    }

    /// What a jailed process given the GPUs at `indices` (of [`NvidiaGpus::gpus`]) is granted. Device nodes are
    /// looked up now: `/dev/nvidia-uvm` appears only once the driver's unified memory module is loaded.
    pub fn grant(&self, indices: &[usize]) -> GpuGrant {
        let own: Vec<&NvidiaGpu> = indices.iter().filter_map(|&i| self.gpus.get(i)).collect();
        let mut grant = GpuGrant::default();
        let nodes = own
            .iter()
            .map(|gpu| format!("nvidia{}", gpu.minor))
            .chain(CONTROL_DEVICES.iter().map(|name| name.to_string()));
        for name in nodes {
            let path = self.dev.join(name);
            if let Some(device) = char_device(&path) {
                grant.char_devices.push(device);
                grant.devices.push(path);
            }
        }
        let caps = self.dev.join("nvidia-caps");
        if caps.is_dir() {
            let entries = std::fs::read_dir(&caps).into_iter().flatten().flatten();
            grant.char_devices.extend(entries.filter_map(|entry| char_device(&entry.path())));
            grant.devices.push(caps);
        }
        let jail_driver = Path::new("/proc/driver/nvidia");
        for name in DRIVER_FILES {
            let host = match (&self.params, *name) {
                (Some(masked), "params") => masked.clone(),
                _ => self.driver.join(name),
            };
            if host.exists() {
                grant.driver_proc.push((host, jail_driver.join(name)));
            }
        }
        for gpu in &own {
            let host = self.driver.join("gpus").join(&gpu.bus_id);
            if host.is_dir() {
                grant.driver_proc.push((host, jail_driver.join("gpus").join(&gpu.bus_id)));
            }
        }
        grant.read_only = self.sysfs();
        if let Some(dir) = &self.library_dir {
            if !in_system_dirs(dir) {
                grant.read_only.push(dir.clone());
            }
            grant.library_path = Some(dir.clone());
        }
        grant
    }

    /// The `/sys` entries CUDA reads: CPU and NUMA topology, the PCI tree, the driver modules' parameters.
    fn sysfs(&self) -> Vec<PathBuf> {
        let mut paths = vec![self.sys.join("devices/system"), self.sys.join("bus/pci/devices")];
        let entries = |dir: PathBuf| std::fs::read_dir(dir).into_iter().flatten().flatten().map(|e| e.path());
        let mut pci: Vec<PathBuf> = entries(self.sys.join("devices"))
            .filter(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("pci")))
            .collect();
        let mut modules: Vec<PathBuf> = entries(self.sys.join("module"))
            .filter(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("nvidia")))
            .collect();
        pci.sort();
        modules.sort();
        paths.extend(pci);
        paths.extend(modules);
        paths.retain(|p| p.exists());
        paths
    }
}

/// A GPU from its `information` file: `Key: \t value` lines.
fn parse_information(bus_id: &str, text: &str) -> Option<NvidiaGpu> {
    let field = |key: &str| {
        text.lines().find_map(|line| {
            let (name, value) = line.split_once(':')?;
            (name.trim() == key).then(|| value.trim().to_string())
        })
    };
    let minor = field("Device Minor")?.parse().ok()?;
    // Until the driver has initialised the GPU it shows `GPU-????????-…`: not a UUID CUDA would accept.
    let uuid = field("GPU UUID").filter(|u| u.starts_with("GPU-") && !u.contains('?'));
    Some(NvidiaGpu { bus_id: bus_id.to_string(), minor, uuid, model: field("Model").unwrap_or_default() })
}

/// `params` with `ModifyDeviceFiles: 1` turned off; `None` where it is off already (or not there).
fn masked_params(params: &str) -> Option<String> {
    if !params.lines().any(|line| line.trim() == "ModifyDeviceFiles: 1") {
        return None;
    }
    let lines: Vec<&str> = params
        .lines()
        .map(|line| if line.trim() == "ModifyDeviceFiles: 1" { "ModifyDeviceFiles: 0" } else { line })
        .collect();
    Some(lines.join("\n") + "\n")
}

/// The character device at `path` (following links), if it is one.
fn char_device(path: &Path) -> Option<CharDevice> {
    let metadata = std::fs::metadata(path).ok()?;
    if !metadata.file_type().is_char_device() {
        return None;
    }
    let rdev = metadata.rdev();
    Some(CharDevice { major: libc::major(rdev), minor: Some(libc::minor(rdev)) })
}

/// The first directory of `LD_LIBRARY_PATH` that holds `libcuda.so.1`.
fn library_dir_from(ld_library_path: Option<std::ffi::OsString>) -> Option<PathBuf> {
    std::env::split_paths(&ld_library_path?)
        .filter(|dir| dir.is_absolute())
        .find(|dir| dir.join("libcuda.so.1").exists())
}

/// Whether the jail shows `dir` already (its system dirs).
fn in_system_dirs(dir: &Path) -> bool {
    ["/usr", "/lib", "/lib64", "/bin", "/sbin", "/etc"].iter().any(|root| dir.starts_with(root))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake driver tree: `/proc/driver/nvidia` with GPUs at the given (bus id, minor, uuid), and `/dev` nodes that
    /// are links to `/dev/null` (a real character device, 1:3) for the GPUs and `nvidiactl`.
    fn fake_host(gpus: &[(&str, u32, &str)]) -> (tempfile::TempDir, NvidiaGpus) {
        let root = tempfile::tempdir().unwrap();
        let driver = root.path().join("proc/driver/nvidia");
        let dev = root.path().join("dev");
        let sys = root.path().join("sys");
        std::fs::create_dir_all(&dev).unwrap();
        std::fs::create_dir_all(sys.join("devices/system/node")).unwrap();
        std::fs::create_dir_all(sys.join("devices/pci0000:00")).unwrap();
        std::fs::create_dir_all(sys.join("bus/pci/devices")).unwrap();
        std::fs::create_dir_all(sys.join("module/nvidia_uvm")).unwrap();
        std::fs::create_dir_all(sys.join("module/loop")).unwrap();
        for (bus, minor, uuid) in gpus {
            let dir = driver.join("gpus").join(bus);
            std::fs::create_dir_all(&dir).unwrap();
            let info = format!(
                "Model: \t\t NVIDIA H200\nIRQ:   \t\t 0\nGPU UUID: \t {uuid}\nBus Location: \t {bus}\nDevice Minor: \t {minor}\n"
            );
            std::fs::write(dir.join("information"), info).unwrap();
            std::os::unix::fs::symlink("/dev/null", dev.join(format!("nvidia{minor}"))).unwrap();
        }
        std::os::unix::fs::symlink("/dev/null", dev.join("nvidiactl")).unwrap();
        // A regular file is no device: left out.
        std::fs::write(dev.join("nvidia-uvm"), "").unwrap();
        std::fs::write(driver.join("version"), "NVRM version: 580\n").unwrap();
        std::fs::write(
            driver.join("params"),
            "ResmanDebugLevel: 4294967295\nModifyDeviceFiles: 1\nDeviceFileMode: 438\n",
        )
        .unwrap();
        let host = NvidiaGpus::discover_at(&driver, &dev, &sys);
        (root, host)
    }

    #[test]
    fn gpus_in_bus_order_with_minors_and_known_uuids() {
        let (_root, host) = fake_host(&[
            ("0000:af:00.0", 0, "GPU-aaaaaaaa-0000-0000-0000-000000000000"),
            ("0000:18:00.0", 1, "GPU-????????-????-????-????-????????????"),
        ]);
        let gpus = host.gpus();
        assert_eq!(gpus.len(), 2);
        assert_eq!((gpus[0].bus_id.as_str(), gpus[0].minor, gpus[0].uuid.as_deref()), ("0000:18:00.0", 1, None));
        assert_eq!(gpus[1].uuid.as_deref(), Some("GPU-aaaaaaaa-0000-0000-0000-000000000000"));
        assert_eq!(gpus[1].model, "NVIDIA H200");
        let none = NvidiaGpus::discover_at(Path::new("/nonexistent"), Path::new("/dev"), Path::new("/sys"));
        assert!(none.is_empty());
    }

    #[test]
    fn a_grant_names_only_its_own_gpu_and_the_control_devices() {
        let (root, mut host) =
            fake_host(&[("0000:18:00.0", 0, "GPU-a"), ("0000:28:00.0", 1, "GPU-b"), ("0000:38:00.0", 2, "GPU-c")]);
        host.prepare_for_jail(&root.path().join("run")).unwrap();
        let grant = host.grant(&[1]);
        let dev = root.path().join("dev");
        assert_eq!(grant.devices, [dev.join("nvidia1"), dev.join("nvidiactl")]);
        assert_eq!(grant.char_devices, [CharDevice { major: 1, minor: Some(3) }; 2]);
        let shown: Vec<&Path> = grant.driver_proc.iter().map(|(_, jail)| jail.as_path()).collect();
        assert_eq!(
            shown,
            ["version", "params", "gpus/0000:28:00.0"]
                .map(|p| Path::new("/proc/driver/nvidia").join(p))
                .iter()
                .collect::<Vec<_>>()
        );
        // The params the jail shows stop the driver's library from making device nodes.
        let params = &grant.driver_proc[1].0;
        assert_eq!(params, &root.path().join("run/nvidia-params"));
        assert!(std::fs::read_to_string(params).unwrap().contains("ModifyDeviceFiles: 0\n"));
        let sys = root.path().join("sys");
        assert_eq!(
            grant.read_only,
            [
                sys.join("devices/system"),
                sys.join("bus/pci/devices"),
                sys.join("devices/pci0000:00"),
                sys.join("module/nvidia_uvm")
            ]
        );
        assert_eq!(grant.library_path, None);
        assert_eq!(CharDevice { major: 195, minor: None }.to_string(), "c 195:*");
    }

    #[test]
    fn the_driver_library_dir_comes_from_ld_library_path_only_where_it_holds_libcuda() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(library_dir_from(Some(dir.path().into())), None);
        std::fs::write(dir.path().join("libcuda.so.1"), "").unwrap();
        let path = std::env::join_paths(["relative", "/nonexistent", dir.path().to_str().unwrap()]).unwrap();
        assert_eq!(library_dir_from(Some(path)).as_deref(), Some(dir.path()));
        assert!(in_system_dirs(Path::new("/usr/local/nvidia/lib64")) && !in_system_dirs(dir.path()));
        assert_eq!(masked_params("ModifyDeviceFiles: 0\n"), None);
    }
}
