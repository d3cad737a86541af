//! Raw device-mapper calls on one thin pool, by ioctl (the `devicemapper` crate): pool
//! messages (`create_thin`, `create_snap`, `delete`, metadata snapshots), activating and
//! deactivating thin devices, the pool's table and status. No state and no retries here;
//! every failure comes back as a [`DmFailure`] carrying the kernel's errno for the caller to
//! classify.
//!
//! Nothing here needs udev or `/dev/mapper/*`: devices are named in ioctls and referenced
//! by major:minor.

use std::fmt;

pub use devicemapper::Device;
use devicemapper::{DM, DevId, DmError, DmFlags, DmName, DmNameBuf, DmOptions, DmUuid, errors};

/// A failed device-mapper call: what was attempted, and the kernel's errno when it came from
/// an ioctl.
#[derive(Debug)]
pub struct DmFailure {
    pub op: String,
    pub errno: Option<i32>,
    pub detail: String,
}

impl fmt::Display for DmFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.errno {
            Some(errno) => write!(f, "{}: {} (errno {errno})", self.op, std::io::Error::from_raw_os_error(errno)),
            None => write!(f, "{}: {}", self.op, self.detail),
        }
    }
}

impl DmFailure {
    fn new(op: impl Into<String>, e: DmError) -> DmFailure {
        let errno = match &e {
            DmError::Core(errors::Error::Ioctl(_, _, _, errno)) => Some(**errno as i32),
            _ => None,
        };
        DmFailure { op: op.into(), errno, detail: e.to_string() }
    }

    pub fn other(op: impl Into<String>, detail: impl Into<String>) -> DmFailure {
        DmFailure { op: op.into(), errno: None, detail: detail.into() }
    }
}

/// An active device-mapper device and the first line of its live table (target, params).
pub struct ActiveDevice {
    pub name: String,
    pub table: Option<(String, String)>,
}

/// One thin pool, found by its device-mapper name.
pub struct Pool {
    dm: DM,
    name: DmNameBuf,
    dev: Device,
}

impl fmt::Debug for Pool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pool").field("name", &(*self.name).to_string()).field("dev", &self.dev.to_string()).finish()
    }
}

fn dm_name(name: &str) -> Result<&DmName, DmFailure> {
    DmName::new(name).map_err(|e| DmFailure::new(format!("device name {name:?}"), e))
}

impl Pool {
    /// Opens `/dev/mapper/control` and checks that `name` is an active `thin-pool` device.
    pub fn open(name: &str) -> Result<Pool, DmFailure> {
        let dm = DM::new().map_err(|e| DmFailure::new("opening /dev/mapper/control", e))?;
        let pool_name = dm_name(name)?.to_owned();
        let info = dm
            .device_info(&DevId::Name(&pool_name))
            .map_err(|e| DmFailure::new(format!("looking up pool {name}"), e))?;
        let pool = Pool { dm, name: pool_name, dev: info.device() };
        let table = pool.table(name)?;
        match table.first() {
            Some((_, _, target, _)) if target == "thin-pool" => Ok(pool),
            Some((_, _, target, _)) => {
                Err(DmFailure::other(format!("pool {name}"), format!("is a {target} device, not a thin-pool")))
            }
            None => Err(DmFailure::other(format!("pool {name}"), "has no table loaded")),
        }
    }

    /// Creates and activates pool `name` on metadata device `meta` and data device `data`
    /// (`data_sectors` long, blocks of `block_sectors`). The host setup's job in production;
    /// tests and the guest use it. A fresh pool needs the first 4 KiB of `meta` zeroed.
    /// `features`: pool table features such as `error_if_no_space`.
    pub fn create(
        name: &str,
        meta: Device,
        data: Device,
        data_sectors: u64,
        block_sectors: u64,
        features: &[&str],
    ) -> Result<Pool, DmFailure> {
        let dm = DM::new().map_err(|e| DmFailure::new("opening /dev/mapper/control", e))?;
        let id = DevId::Name(dm_name(name)?);
        dm.device_create(dm_name(name)?, None, DmOptions::default())
            .map_err(|e| DmFailure::new(format!("creating pool device {name}"), e))?;
        let params = format!("{meta} {data} {block_sectors} 0 {} {}", features.len(), features.join(" "));
        let table = [(0, data_sectors, "thin-pool".to_owned(), params)];
        dm.table_load(&id, &table, DmOptions::default())
            .map_err(|e| DmFailure::new(format!("loading pool {name}"), e))?;
        dm.device_suspend(&id, DmOptions::default()).map_err(|e| DmFailure::new(format!("resuming pool {name}"), e))?;
        drop(dm);
        Pool::open(name)
    }

    /// Reloads the pool's table with or without the `read_only` feature (suspend, load,
    /// resume). For tests of a pool that has turned read-only.
    pub fn set_read_only(&self, read_only: bool) -> Result<(), DmFailure> {
        let name = self.name();
        let (start, len, target, params) = self
            .table(&name)?
            .into_iter()
            .next()
            .ok_or_else(|| DmFailure::other(format!("pool {name}"), "no table"))?;
        // params: <meta> <data> <block> <low water> <#features> [features...]
        let fixed: Vec<&str> = params.split_whitespace().take(4).collect();
        let params =
            if read_only { format!("{} 1 read_only", fixed.join(" ")) } else { format!("{} 0", fixed.join(" ")) };
        let id = DevId::Name(&self.name);
        self.dm
            .device_suspend(&id, DmOptions::default().set_flags(DmFlags::DM_SUSPEND))
            .map_err(|e| DmFailure::new(format!("suspending pool {name}"), e))?;
        self.dm
            .table_load(&id, &[(start, len, target, params)], DmOptions::default())
            .map_err(|e| DmFailure::new(format!("reloading pool {name}"), e))?;
        self.dm
            .device_suspend(&id, DmOptions::default())
            .map_err(|e| DmFailure::new(format!("resuming pool {name}"), e))?;
        Ok(())
    }

    /// Removes the pool device itself (its thin devices must be inactive).
    pub fn remove(self) -> Result<(), DmFailure> {
        let name = self.name();
        self.dm
            .device_remove(&DevId::Name(&self.name), DmOptions::default())
            .map_err(|e| DmFailure::new(format!("removing pool {name}"), e))?;
        Ok(())
    }

    pub fn name(&self) -> String {
        (*self.name).to_string()
    }

    /// The pool's major:minor.
    pub fn device(&self) -> Device {
        self.dev
    }

    /// Sends a message to the pool (`create_thin 5`, `delete 5`, ...).
    pub fn message(&self, msg: &str) -> Result<Option<String>, DmFailure> {
        self.dm
            .target_msg(&DevId::Name(&self.name), None, msg)
            .map(|(_, out)| out)
            .map_err(|e| DmFailure::new(format!("pool {} message {msg:?}", self.name()), e))
    }

    /// The pool's status line (`<transaction> <meta used>/<total> <data used>/<total> ...
    /// rw|ro|out_of_data_space ...` or `Fail`).
    pub fn status(&self) -> Result<String, DmFailure> {
        let (_, status) = self
            .dm
            .table_status(&DevId::Name(&self.name), DmOptions::default())
            .map_err(|e| DmFailure::new(format!("status of pool {}", self.name()), e))?;
        Ok(status.into_iter().map(|(_, _, _, params)| params).collect::<Vec<_>>().join("; "))
    }

    /// The live table of device `name`: (start, length, target, params) per line.
    pub fn table(&self, name: &str) -> Result<Vec<(u64, u64, String, String)>, DmFailure> {
        self.dm
            .table_status(&DevId::Name(dm_name(name)?), DmOptions::default().set_flags(DmFlags::DM_STATUS_TABLE))
            .map(|(_, table)| table)
            .map_err(|e| DmFailure::new(format!("table of {name}"), e))
    }

    /// The pool's metadata device (the first argument of its table).
    pub fn metadata_device(&self) -> Result<Device, DmFailure> {
        let table = self.table(&(*self.name).to_string())?;
        let params = table.first().map(|(_, _, _, p)| p.clone()).unwrap_or_default();
        let first = params.split_whitespace().next().unwrap_or_default();
        first
            .parse::<Device>()
            .map_err(|e| DmFailure::other(format!("pool {} table {params:?}", self.name()), e.to_string()))
    }

    /// The device number of active device `name`, or `None` if no such device is active.
    pub fn active(&self, name: &str) -> Result<Option<Device>, DmFailure> {
        match self.dm.device_info(&DevId::Name(dm_name(name)?)) {
            Ok(info) => Ok(Some(info.device())),
            Err(e) => {
                let failure = DmFailure::new(format!("looking up {name}"), e);
                if failure.errno == Some(libc::ENXIO) { Ok(None) } else { Err(failure) }
            }
        }
    }

    /// Activates thin device `thin_id` of this pool as `name` (with `uuid`, which the kernel
    /// keeps unique: one uuid per thin id means one name per thin id). Already active under
    /// `name` with the right table: returns it. A device left without a table by an
    /// interrupted activation gets its table now.
    pub fn activate(&self, name: &str, uuid: &str, thin_id: u64, sectors: u64) -> Result<Device, DmFailure> {
        let id = DevId::Name(dm_name(name)?);
        let params = format!("{} {thin_id}", self.dev);
        if let Some(device) = self.active(name)? {
            let table = self.table(name)?;
            match table.first() {
                Some((_, _, target, p)) if target == "thin" && *p == params => return Ok(device),
                Some((_, _, target, p)) => {
                    return Err(DmFailure::other(
                        format!("activating {name}"),
                        format!("a device of that name maps {target} {p}, not thin {params}"),
                    ));
                }
                None => {} // created, never loaded: load it below
            }
        } else {
            let uuid = DmUuid::new(uuid).map_err(|e| DmFailure::new(format!("device uuid {uuid:?}"), e))?;
            self.dm
                .device_create(dm_name(name)?, Some(uuid), DmOptions::default())
                .map_err(|e| DmFailure::new(format!("creating device {name} (thin id {thin_id})"), e))?;
        }
        let table = [(0, sectors, "thin".to_owned(), params)];
        if let Err(e) = self.dm.table_load(&id, &table, DmOptions::default()) {
            let failure = DmFailure::new(format!("loading the table of {name} (thin id {thin_id})"), e);
            // Leave no empty device behind; the load error is the one that matters.
            if let Err(remove) = self.dm.device_remove(&id, DmOptions::default()) {
                tracing::warn!(device = name, error = %DmFailure::new("removing", remove), "could not remove a device whose table did not load");
            }
            return Err(failure);
        }
        let info = self
            .dm
            .device_suspend(&id, DmOptions::default())
            .map_err(|e| DmFailure::new(format!("resuming {name}"), e))?;
        Ok(info.device())
    }

    /// Removes device `name`. Returns whether it was active. The crate retries `EBUSY` a
    /// few times before giving up.
    pub fn deactivate(&self, name: &str) -> Result<bool, DmFailure> {
        match self.dm.device_remove(&DevId::Name(dm_name(name)?), DmOptions::default()) {
            Ok(_) => Ok(true),
            Err(e) => {
                let failure = DmFailure::new(format!("removing device {name}"), e);
                if failure.errno == Some(libc::ENXIO) { Ok(false) } else { Err(failure) }
            }
        }
    }

    /// Every active device with its name and live table's first line, for finding devices
    /// that map thin ids of this pool.
    pub fn devices(&self) -> Result<Vec<ActiveDevice>, DmFailure> {
        let list = self.dm.list_devices().map_err(|e| DmFailure::new("listing devices", e))?;
        let mut out = Vec::with_capacity(list.len());
        for (name, _, _) in list {
            let name = (*name).to_string();
            let table = self.table(&name)?.into_iter().next().map(|(_, _, target, params)| (target, params));
            out.push(ActiveDevice { name, table });
        }
        Ok(out)
    }
}
