//! The declaration of `kind = "rbd"` and its [`BdevKind`].

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use ferroblk_bdev::decl::{block_size, blocks};
use ferroblk_bdev::{Bdev, BdevError, BdevKind, ByteSize, Kinds};
use serde::{Deserialize, Serialize};

use crate::bdev::{KIND, RbdBdev};
use crate::cluster::{Auth, Cluster, ClusterConfig};
use crate::image::{Image, ImageSpec};

fn default_client() -> String {
    "admin".into()
}

fn default_block_size() -> u32 {
    4096
}

fn default_connections() -> u32 {
    1
}

fn default_connect_timeout() -> u64 {
    10
}

fn default_op_timeout() -> u64 {
    30
}

/// Most librados handles per cluster.
pub const MAX_CONNECTIONS: u32 = 16;

/// `kind = "rbd"`: an image of a Ceph cluster, through librbd.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RbdDecl {
    /// Unique name.
    pub name: String,
    /// A ceph.conf to read (monitors, keyring, options); `mon_host` overrides its monitors.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conf: Option<PathBuf>,
    /// Monitor addresses, as ceph.conf's `mon host` writes them (`127.0.0.1:6789`,
    /// `[v2:10.0.0.1:3300]`, several separated by commas).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mon_host: Option<String>,
    /// The client id: `admin` (default) connects as `client.admin`.
    #[serde(default = "default_client")]
    pub client: String,
    /// The keyring holding the client's key (default: the configuration file's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keyring: Option<PathBuf>,
    /// `cephx` (default) or `none`, for a cluster running without authentication.
    #[serde(default)]
    pub auth: Auth,
    /// The pool.
    pub pool: String,
    /// The RADOS namespace inside the pool (default: none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// The image's name.
    pub image: String,
    /// Create the image if missing (needs `size`; default false).
    #[serde(default)]
    pub create: bool,
    /// Size in bytes: the size of a created image; an existing one must be at least this big.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<ByteSize>,
    /// 512 or 4096 (default 4096).
    #[serde(default = "default_block_size")]
    pub block_size: u32,
    /// Open read-only (default false).
    #[serde(default)]
    pub read_only: bool,
    /// librados connections to the cluster, shared by every image declaring the same cluster
    /// settings (default 1, at most 16): one connection's threads limit how far its images scale.
    #[serde(default = "default_connections")]
    pub connections: u32,
    /// Seconds to wait for the monitors when connecting and for each monitor operation (default
    /// 10).
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout_secs: u64,
    /// Seconds after which a request the cluster does not answer fails with an I/O error
    /// (default 30).
    #[serde(default = "default_op_timeout")]
    pub op_timeout_secs: u64,
}

impl RbdDecl {
    /// The cluster settings.
    pub fn cluster(&self) -> ClusterConfig {
        ClusterConfig {
            conf: self.conf.clone(),
            mon_host: self.mon_host.clone(),
            client: self.client.clone(),
            keyring: self.keyring.clone(),
            auth: self.auth,
            connections: self.connections as usize,
            connect_timeout: Duration::from_secs(self.connect_timeout_secs),
            op_timeout: Duration::from_secs(self.op_timeout_secs),
        }
    }

    /// Where the image is and how to open it.
    pub fn spec(&self) -> ImageSpec {
        ImageSpec {
            pool: self.pool.clone(),
            namespace: self.namespace.clone(),
            image: self.image.clone(),
            create_size: if self.create {
                self.size.map(|s| s.0)
            } else {
                None
            },
            read_only: self.read_only,
        }
    }

    /// Checks what needs no cluster; errors name the field.
    pub fn validate(&self) -> Result<(), BdevError> {
        let bs = block_size(self.block_size)?;
        if self.conf.is_none() && self.mon_host.is_none() {
            return Err(BdevError::invalid(
                "mon_host",
                "give mon_host or conf to say where the cluster is",
            ));
        }
        if self.mon_host.as_deref() == Some("") {
            return Err(BdevError::invalid("mon_host", "is empty"));
        }
        for (field, v) in [
            ("client", &self.client),
            ("pool", &self.pool),
            ("image", &self.image),
        ] {
            if v.is_empty() {
                return Err(BdevError::invalid(field, "is empty"));
            }
        }
        if let Some(size) = self.size {
            blocks(size, bs)?;
        }
        if self.create && self.size.is_none() {
            return Err(BdevError::invalid("size", "create = true needs a size"));
        }
        if self.create && self.read_only {
            return Err(BdevError::invalid(
                "read_only",
                "a read-only volume cannot create its image",
            ));
        }
        if self.auth == Auth::None && self.keyring.is_some() {
            return Err(BdevError::invalid(
                "keyring",
                "auth = \"none\" takes no keyring",
            ));
        }
        if !(1..=MAX_CONNECTIONS).contains(&self.connections) {
            return Err(BdevError::invalid(
                "connections",
                format!("must be 1 to {MAX_CONNECTIONS}"),
            ));
        }
        if self.connect_timeout_secs == 0 {
            return Err(BdevError::invalid(
                "connect_timeout_secs",
                "must be at least 1",
            ));
        }
        if self.op_timeout_secs == 0 {
            return Err(BdevError::invalid("op_timeout_secs", "must be at least 1"));
        }
        Ok(())
    }

    /// What `check-config` runs: the files it reads (the configuration file, the keyring),
    /// then the cluster, as opening the volume would reach it but changing nothing: connects
    /// (one connection, bounded by `connect_timeout_secs`), opens the pool and the image
    /// read-only and compares the image's size with `size`. An image missing with
    /// `create = true` passes (`serve` creates it). Errors are those of opening, naming the
    /// field.
    pub fn check(&self) -> Result<(), BdevError> {
        for (field, p) in [("conf", &self.conf), ("keyring", &self.keyring)] {
            if let Some(p) = p
                && let Err(e) = std::fs::File::open(p)
            {
                return Err(BdevError::invalid(
                    field,
                    format!("cannot read {}: {e}", p.display()),
                ));
            }
        }
        let mut cluster = self.cluster();
        cluster.connections = 1;
        let cluster = Cluster::get(&cluster)?;
        if let Some(bytes) = Image::probe(cluster, &self.spec())? {
            let bs = block_size(self.block_size)?;
            self.check_size(bs.to_bytes(bytes >> bs.shift()))?;
        }
        Ok(())
    }

    /// An existing image must hold the declared `size`; `have` is its size in whole blocks.
    fn check_size(&self, have: u64) -> Result<(), BdevError> {
        if let Some(size) = self.size
            && have < size.0
        {
            return Err(BdevError::invalid(
                "size",
                format!(
                    "image '{}' is {have} bytes, smaller than the declared {}",
                    self.image, size.0
                ),
            ));
        }
        Ok(())
    }

    /// Opens the volume (blocking; control plane).
    pub fn open(&self) -> Result<RbdBdev, BdevError> {
        self.validate()?;
        let bs = block_size(self.block_size)?;
        let b = RbdBdev::open(&self.name, &self.cluster(), self.spec(), bs)?;
        self.check_size(b.info().block_size().to_bytes(b.info().block_count()))?;
        Ok(b)
    }
}

/// `kind = "rbd"`.
pub struct RbdKind;

impl BdevKind for RbdKind {
    const NAME: &'static str = KIND;
    type Config = RbdDecl;
    fn name(c: &RbdDecl) -> &str {
        &c.name
    }
    fn validate(c: &RbdDecl) -> Result<(), BdevError> {
        c.validate()
    }
    fn check(c: &RbdDecl) -> Result<(), BdevError> {
        c.check()
    }
    fn build(c: &RbdDecl, _bases: Vec<Arc<dyn Bdev>>) -> Result<Arc<dyn Bdev>, BdevError> {
        Ok(Arc::new(c.open()?))
    }
    fn set_size(c: &mut RbdDecl, bytes: u64) {
        c.size = Some(ByteSize(bytes));
    }
}

/// Adds `rbd` to a program's list of kinds.
pub fn add_kinds(kinds: &mut Kinds) -> &mut Kinds {
    kinds.add::<RbdKind>()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> RbdDecl {
        toml::from_str(s).unwrap()
    }

    #[test]
    fn defaults_and_field_checks() {
        let d = parse("name = \"r\"\nmon_host = \"127.0.0.1:1\"\npool = \"p\"\nimage = \"i\"\n");
        d.validate().unwrap();
        assert_eq!(d.client, "admin");
        assert_eq!((d.block_size, d.connections), (4096, 1));
        assert_eq!(d.auth, Auth::Cephx);
        let field = |s: &str| parse(s).validate().unwrap_err().field().map(str::to_string);
        let base = "name = \"r\"\npool = \"p\"\nimage = \"i\"\n";
        assert_eq!(field(base).as_deref(), Some("mon_host"));
        let base = format!("{base}mon_host = \"127.0.0.1\"\n");
        assert_eq!(
            field(&format!("{base}create = true\n")).as_deref(),
            Some("size")
        );
        assert_eq!(
            field(&format!(
                "{base}create = true\nsize = 4096\nread_only = true\n"
            ))
            .as_deref(),
            Some("read_only")
        );
        assert_eq!(
            field(&format!("{base}size = 1000\n")).as_deref(),
            Some("size")
        );
        assert_eq!(
            field(&format!("{base}connections = 0\n")).as_deref(),
            Some("connections")
        );
        assert_eq!(
            field(&format!("{base}block_size = 1024\n")).as_deref(),
            Some("block_size")
        );
        assert_eq!(
            field(&format!("{base}auth = \"none\"\nkeyring = \"/k\"\n")).as_deref(),
            Some("keyring")
        );
        assert_eq!(
            parse(&format!("{base}keyring = \"/nonexistent/k\"\n"))
                .check()
                .unwrap_err()
                .field(),
            Some("keyring")
        );
        let e = toml::from_str::<RbdDecl>(&format!("{base}cache = true\n")).unwrap_err();
        assert!(e.to_string().contains("unknown field"), "{e}");
    }

    #[test]
    fn rbd_is_a_kind() {
        let mut kinds = Kinds::core();
        add_kinds(&mut kinds);
        let d = kinds
            .parse(serde_json::json!({
                "kind": "rbd", "name": "r", "mon_host": "127.0.0.1", "pool": "p", "image": "i",
                "create": true, "size": "1MiB"
            }))
            .unwrap();
        assert_eq!(d.kind(), "rbd");
        d.validate().unwrap();
        let mut d = d;
        d.set_size(2 << 20);
        assert_eq!(d.to_json()["size"], 2 << 20);
    }
}
