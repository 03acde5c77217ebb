//! A stand-in NVML host for the tests and benches: a temporary folder
//! with a copy of a fixture (`host.toml`) and a copy of the stand-in
//! `libnvidia-ml.so` (`nvml-standin/`, a dev-dependency, so cargo builds it
//! next to the test or bench executable) that answers from it. The dynamic
//! loader keeps one instance per file, so copies keep the tests apart.

use std::path::{Path, PathBuf};

use gpuwarden::gpu::nvml::NvmlBackend;
use gpuwarden::gpu::simulated::SimulatedHost;
use tempfile::TempDir;

/// The stand-in cargo built for this test run.
pub fn built_standin() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let deps = exe.parent().unwrap();
    [deps, deps.parent().unwrap()]
        .iter()
        .map(|dir| dir.join("libnvidia_ml_standin.so"))
        .find(|path| path.exists())
        .unwrap_or_else(|| {
            panic!(
                "no libnvidia_ml_standin.so near {}: build it with `cargo build -p nvml-standin`",
                exe.display()
            )
        })
}

/// A temporary folder with a copy of a fixture (`host.toml`) and a copy of
/// the stand-in (`libnvidia-ml.so.1`) that answers from it.
pub struct StandinHost {
    dir: TempDir,
}

impl StandinHost {
    pub fn new(fixture: &str) -> Self {
        let text = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("fixtures")
                .join(fixture),
        )
        .unwrap();
        Self::with_text(&text)
    }

    pub fn with_text(fixture: &str) -> Self {
        let host = Self {
            dir: tempfile::tempdir().unwrap(),
        };
        host.write_fixture(fixture);
        std::fs::copy(built_standin(), host.library()).unwrap();
        std::fs::write(host.fixture_pointer(), "host.toml").unwrap();
        host
    }

    pub fn fixture(&self) -> PathBuf {
        self.dir.path().join("host.toml")
    }

    pub fn library(&self) -> PathBuf {
        self.dir.path().join("libnvidia-ml.so.1")
    }

    /// The file next to the library that names the fixture it answers
    /// from.
    pub fn fixture_pointer(&self) -> PathBuf {
        self.dir.path().join("libnvidia-ml.so.1.fixture")
    }

    pub fn write_fixture(&self, text: &str) {
        std::fs::write(self.fixture(), text).unwrap();
    }

    /// Writes the runtime events file both backends read.
    pub fn raise(&self, events: &str) {
        std::fs::write(self.dir.path().join("host.events.toml"), events).unwrap();
    }

    pub fn nvml(&self) -> NvmlBackend {
        NvmlBackend::open(Some(&self.library())).unwrap()
    }

    pub fn simulated(&self) -> SimulatedHost {
        SimulatedHost::open(&self.fixture()).unwrap()
    }
}
