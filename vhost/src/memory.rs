//! The guest's memory, mapped from the descriptors of `SET_MEM_TABLE`.
//!
//! Guest memory is never a `&[u8]`: the guest may change it at any moment, so it is reached only
//! through raw pointers returned by the bounds-checked translations below, and read with
//! volatile accesses or copied out once before use.

use std::os::fd::{AsRawFd, OwnedFd};

/// One mapped region (shared by successive memory tables when regions are added or removed).
#[derive(Debug)]
struct Region {
    gpa: u64,
    size: u64,
    uva: u64,
    host: *mut u8,
    map_base: *mut u8,
    map_len: usize,
}

// SAFETY: the mapping is plain shared memory owned by the region until drop.
unsafe impl Send for Region {}
// SAFETY: as above; the region is immutable after construction.
unsafe impl Sync for Region {}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: `map_base..map_base+map_len` was mapped in `map_region` and is unmapped once.
        unsafe { libc::munmap(self.map_base.cast(), self.map_len) };
    }
}

fn map_region(d: &RegionDesc, fd: &OwnedFd) -> Result<Region, String> {
    if d.memory_size == 0 {
        return Err("empty memory region".into());
    }
    if d.guest_phys_addr.checked_add(d.memory_size).is_none()
        || d.user_addr.checked_add(d.memory_size).is_none()
    {
        return Err("memory region wraps around".into());
    }
    // mmap maps past the end of a file without complaint, and touching those pages raises
    // SIGBUS in whichever thread reads the ring: the region must lie within its file.
    // SAFETY: a zeroed `stat` is valid; fstat writes only into it.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat on a descriptor we own, into the live buffer above.
    if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } != 0 {
        return Err(format!(
            "cannot stat guest memory: {}",
            std::io::Error::last_os_error()
        ));
    }
    if st.st_mode & libc::S_IFMT == libc::S_IFREG
        && d.mmap_offset
            .checked_add(d.memory_size)
            .is_none_or(|end| end > st.st_size as u64)
    {
        return Err(format!(
            "memory region at offset {:#x} of {:#x} bytes ends beyond its file ({:#x} bytes)",
            d.mmap_offset, d.memory_size, st.st_size
        ));
    }
    // mmap needs a page-aligned offset: map from the page boundary below it.
    let page = 4096u64;
    let skew = d.mmap_offset % page;
    let map_len = usize::try_from(d.memory_size + skew).map_err(|_| "region too large")?;
    // SAFETY: a fresh shared mapping of the front-end's descriptor; the result is checked.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            map_len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED | libc::MAP_NORESERVE,
            fd.as_raw_fd(),
            (d.mmap_offset - skew) as libc::off_t,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(format!(
            "cannot map guest memory region: {}",
            std::io::Error::last_os_error()
        ));
    }
    let map_base = p.cast::<u8>();
    Ok(Region {
        gpa: d.guest_phys_addr,
        size: d.memory_size,
        uva: d.user_addr,
        // SAFETY: `skew < map_len`, inside the mapping.
        host: unsafe { map_base.add(skew as usize) },
        map_base,
        map_len,
    })
}

/// A region as the front-end describes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RegionDesc {
    /// Guest physical address.
    pub guest_phys_addr: u64,
    /// Size in bytes.
    pub memory_size: u64,
    /// Address of the region in the front-end's process (vring addresses use these).
    pub user_addr: u64,
    /// Offset of the region in its file descriptor.
    pub mmap_offset: u64,
}

/// The mapped guest memory: an immutable table of regions.
#[derive(Debug, Clone)]
pub struct GuestMemory {
    regions: Vec<std::sync::Arc<Region>>,
}

/// Most regions a table may hold (`GET_MAX_MEM_SLOTS`).
pub const MAX_REGIONS: usize = 32;

impl GuestMemory {
    /// An empty memory (before `SET_MEM_TABLE`).
    pub fn empty() -> GuestMemory {
        GuestMemory {
            regions: Vec::new(),
        }
    }

    /// Maps every region from its descriptor.
    pub fn new(descs: &[RegionDesc], fds: &[OwnedFd]) -> Result<GuestMemory, String> {
        if descs.len() != fds.len() {
            return Err(format!(
                "{} regions but {} descriptors",
                descs.len(),
                fds.len()
            ));
        }
        let mut mem = GuestMemory::empty();
        for (d, fd) in descs.iter().zip(fds) {
            mem = mem.with_region(d, fd)?;
        }
        Ok(mem)
    }

    /// This table plus one more region (`ADD_MEM_REG`).
    pub fn with_region(&self, d: &RegionDesc, fd: &OwnedFd) -> Result<GuestMemory, String> {
        if self.regions.len() >= MAX_REGIONS {
            return Err(format!("more than {MAX_REGIONS} memory regions"));
        }
        let end = d.guest_phys_addr.saturating_add(d.memory_size);
        if self
            .regions
            .iter()
            .any(|r| d.guest_phys_addr < r.gpa + r.size && r.gpa < end)
        {
            return Err("overlapping memory regions".into());
        }
        let r = map_region(d, fd)?;
        let mut regions = self.regions.clone();
        regions.push(std::sync::Arc::new(r));
        Ok(GuestMemory { regions })
    }

    /// This table without the region at `gpa` of `size` bytes (`REM_MEM_REG`).
    pub fn without_region(&self, gpa: u64, size: u64) -> Result<GuestMemory, String> {
        let mut regions = self.regions.clone();
        let before = regions.len();
        regions.retain(|r| !(r.gpa == gpa && r.size == size));
        if regions.len() == before {
            return Err(format!("no memory region at {gpa:#x} of {size} bytes"));
        }
        Ok(GuestMemory { regions })
    }

    /// Host address of guest physical range `gpa..gpa+len`, if it lies inside one region.
    #[inline]
    pub fn gpa_to_host(&self, gpa: u64, len: u64) -> Option<*mut u8> {
        let end = gpa.checked_add(len)?;
        for r in &self.regions {
            if gpa >= r.gpa && end <= r.gpa + r.size {
                // SAFETY: `gpa - r.gpa + len <= r.size`, inside the mapping.
                return Some(unsafe { r.host.add((gpa - r.gpa) as usize) });
            }
        }
        None
    }

    /// Host address of front-end virtual range `uva..uva+len` (vring addresses).
    pub fn uva_to_host(&self, uva: u64, len: u64) -> Option<*mut u8> {
        let end = uva.checked_add(len)?;
        for r in &self.regions {
            if uva >= r.uva && end <= r.uva + r.size {
                // SAFETY: inside the mapping, as in `gpa_to_host`.
                return Some(unsafe { r.host.add((uva - r.uva) as usize) });
            }
        }
        None
    }

    /// Number of regions.
    pub fn len(&self) -> usize {
        self.regions.len()
    }

    /// Whether no memory is mapped.
    pub fn is_empty(&self) -> bool {
        self.regions.is_empty()
    }
}

/// A memfd of `size` bytes, zero-filled (for tests and the inflight region).
pub fn memfd(name: &str, size: u64) -> std::io::Result<OwnedFd> {
    use std::os::fd::FromRawFd;
    let cname = std::ffi::CString::new(name).expect("no NUL in name");
    // SAFETY: memfd_create with a valid C string; the result is checked.
    let fd = unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a new descriptor nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: ftruncate on the descriptor just created.
    if unsafe { libc::ftruncate(fd.as_raw_fd(), size as libc::off_t) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(fd)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn translations_are_bounds_checked() {
        let fd = memfd("t", 1 << 20).unwrap();
        let d = RegionDesc {
            guest_phys_addr: 0x10000,
            memory_size: 1 << 20,
            user_addr: 0x7f00_0000_0000,
            mmap_offset: 0,
        };
        let m = GuestMemory::new(&[d], &[fd]).unwrap();
        assert!(m.gpa_to_host(0x10000, 16).is_some());
        assert!(m.gpa_to_host(0x10000 + (1 << 20) - 16, 16).is_some());
        assert!(m.gpa_to_host(0x10000 + (1 << 20) - 15, 16).is_none());
        assert!(m.gpa_to_host(0xffff, 2).is_none());
        assert!(m.gpa_to_host(u64::MAX - 3, 16).is_none());
        assert!(m.uva_to_host(0x7f00_0000_0000, 8).is_some());
        assert!(m.uva_to_host(0x10000, 8).is_none());
    }

    #[test]
    fn bad_tables_are_refused() {
        let d = RegionDesc {
            guest_phys_addr: 0,
            memory_size: 4096,
            user_addr: 0,
            mmap_offset: 0,
        };
        assert!(GuestMemory::new(&[d, d], &[memfd("a", 4096).unwrap()]).is_err());
        assert!(
            GuestMemory::new(
                &[d, d],
                &[memfd("a", 4096).unwrap(), memfd("b", 4096).unwrap()]
            )
            .is_err(),
            "overlap"
        );
        let empty = RegionDesc {
            memory_size: 0,
            ..d
        };
        assert!(GuestMemory::new(&[empty], &[memfd("a", 4096).unwrap()]).is_err());
    }

    #[test]
    fn regions_are_added_and_removed() {
        let d = RegionDesc {
            guest_phys_addr: 0,
            memory_size: 4096,
            user_addr: 0,
            mmap_offset: 0,
        };
        let m = GuestMemory::empty()
            .with_region(&d, &memfd("a", 4096).unwrap())
            .unwrap();
        let d2 = RegionDesc {
            guest_phys_addr: 8192,
            user_addr: 8192,
            ..d
        };
        let m2 = m.with_region(&d2, &memfd("b", 4096).unwrap()).unwrap();
        assert!(m2.gpa_to_host(8192, 8).is_some());
        assert!(m2.with_region(&d2, &memfd("c", 4096).unwrap()).is_err());
        let m3 = m2.without_region(0, 4096).unwrap();
        assert!(m3.gpa_to_host(0, 8).is_none());
        assert!(m3.gpa_to_host(8192, 8).is_some());
        assert!(m3.without_region(0, 4096).is_err());
        // The first table still works: mappings are shared, not moved.
        assert!(m.gpa_to_host(0, 8).is_some());
    }
}
