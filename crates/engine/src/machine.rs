//! Machine types: named ceilings of CPU, memory, processes and GPUs.

use std::collections::BTreeMap;

const MIB: u64 = 1024 * 1024;
const GIB: u64 = 1024 * MIB;
/// Processes and threads a worker may have; enough for thread pools and multiprocessing, not for a fork bomb.
const DEFAULT_PIDS: u64 = 1024;

#[derive(Debug, Clone, PartialEq)]
pub struct MachineType {
    pub name: String,
    pub cpus: f64,
    pub memory_bytes: u64,
    pub gpus: u32,
    pub pids: u64,
}

impl MachineType {
    pub fn new(name: &str, cpus: f64, memory_bytes: u64, gpus: u32) -> Self {
        Self { name: name.to_string(), cpus, memory_bytes, gpus, pids: DEFAULT_PIDS }
    }

    /// The memory ceiling as people write it: "256 MB", "1 GB".
    pub fn memory_display(&self) -> String {
        if self.memory_bytes.is_multiple_of(GIB) {
            format!("{} GB", self.memory_bytes / GIB)
        } else {
            format!("{} MB", self.memory_bytes / MIB)
        }
    }
}

/// The catalogue of machine types a host offers.
#[derive(Debug, Clone)]
pub struct MachineTypes(BTreeMap<String, MachineType>);

#[derive(Debug, Clone, thiserror::Error)]
#[error("unknown machine type {name:?}; valid machine types are: {}", valid.join(", "))]
pub struct UnknownMachineType {
    pub name: String,
    pub valid: Vec<String>,
}

impl MachineTypes {
    /// The machine types of fal-serverless's reference.
    pub fn builtin() -> Self {
        let types = [
            MachineType::new("XS", 0.25, 256 * MIB, 0),
            MachineType::new("S", 0.5, GIB, 0),
            MachineType::new("M", 2.0, 8 * GIB, 0),
            MachineType::new("L", 4.0, 32 * GIB, 0),
            MachineType::new("XL", 8.0, 128 * GIB, 0),
            MachineType::new("GPU-T4", 4.0, 26 * GIB, 1),
            MachineType::new("GPU", 8.0, 64 * GIB, 1),
        ];
        Self(types.into_iter().map(|t| (t.name.clone(), t)).collect())
    }

    /// Adds `machine_type`, or replaces the one of the same name.
    pub fn insert(&mut self, machine_type: MachineType) {
        self.0.insert(machine_type.name.clone(), machine_type);
    }

    pub fn get(&self, name: &str) -> Result<&MachineType, UnknownMachineType> {
        self.0.get(name).ok_or_else(|| UnknownMachineType { name: name.to_string(), valid: self.names() })
    }

    /// Names in the order of the reference: smallest first, GPU types last.
    pub fn names(&self) -> Vec<String> {
        let mut types: Vec<&MachineType> = self.0.values().collect();
        types.sort_by_key(|t| (t.gpus, t.memory_bytes));
        types.into_iter().map(|t| t.name.clone()).collect()
    }

    pub fn iter(&self) -> impl Iterator<Item = &MachineType> {
        let names = self.names();
        names.into_iter().filter_map(move |n| self.0.get(&n))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reference_machine_types_in_reference_order() {
        let types = MachineTypes::builtin();
        assert_eq!(types.names(), ["XS", "S", "M", "L", "XL", "GPU-T4", "GPU"]);
        assert_eq!(types.get("S").map(|t| t.memory_display()).ok(), Some("1 GB".to_string()));
        assert_eq!(types.get("XS").map(|t| t.memory_display()).ok(), Some("256 MB".to_string()));
    }

    #[test]
    fn unknown_machine_type_lists_the_valid_ones() {
        let err = MachineTypes::builtin().get("XXL").unwrap_err();
        assert_eq!(
            err.to_string(),
            "unknown machine type \"XXL\"; valid machine types are: XS, S, M, L, XL, GPU-T4, GPU"
        );
    }
}
