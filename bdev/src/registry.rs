//! The set of bdevs of a daemon, by name: creation from declarations, lookup, deletion (refused
//! while another bdev or an export uses it), resize.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use crate::bdev::Bdev;
use crate::decl::{BdevDecl, DeclListError, creation_order};
use crate::error::BdevError;

struct Entry {
    bdev: Arc<dyn Bdev>,
    decl: BdevDecl,
    claims: Vec<String>,
}

/// The daemon's bdevs.
#[derive(Default)]
pub struct BdevRegistry {
    entries: Mutex<BTreeMap<String, Entry>>,
}

impl BdevRegistry {
    /// An empty registry.
    pub fn new() -> BdevRegistry {
        BdevRegistry::default()
    }

    /// Creates every declared bdev, bases first. On error nothing of the list is kept.
    pub fn create_all<D: AsRef<BdevDecl>>(&self, decls: &[D]) -> Result<(), DeclListError> {
        let order = {
            let e = self.entries.lock().expect("registry lock");
            creation_order(decls, &|n| e.contains_key(n))?
        };
        let mut created: Vec<String> = Vec::new();
        for i in order {
            let d = decls[i].as_ref();
            if let Err(error) = self.create(d.clone()) {
                for name in created.iter().rev() {
                    let _ = self.delete(name);
                }
                return Err(DeclListError { index: i, error });
            }
            created.push(d.name().to_string());
        }
        Ok(())
    }

    /// Creates one bdev; its bases, if any, must exist.
    pub fn create(&self, decl: BdevDecl) -> Result<Arc<dyn Bdev>, BdevError> {
        decl.validate()?;
        let name = decl.name().to_string();
        let bases = {
            let e = self.entries.lock().expect("registry lock");
            if e.contains_key(&name) {
                return Err(BdevError::Exists(name));
            }
            decl.base_refs()
                .into_iter()
                .map(|b| {
                    e.get(b.name).map(|x| x.bdev.clone()).ok_or_else(|| {
                        BdevError::invalid(b.field, format!("no bdev named '{}'", b.name))
                    })
                })
                .collect::<Result<Vec<_>, _>>()?
        };
        // Opening files may block: done without holding the lock.
        let bdev = decl.build(bases)?;
        let mut e = self.entries.lock().expect("registry lock");
        if e.contains_key(&name) {
            return Err(BdevError::Exists(name));
        }
        tracing::info!(bdev = %name, kind = decl.kind(), blocks = bdev.info().block_count(),
            block_size = bdev.info().block_size().bytes(), "bdev created");
        e.insert(
            name,
            Entry {
                bdev: bdev.clone(),
                decl,
                claims: Vec::new(),
            },
        );
        Ok(bdev)
    }

    /// The bdev named `name`.
    pub fn get(&self, name: &str) -> Option<Arc<dyn Bdev>> {
        self.entries
            .lock()
            .expect("registry lock")
            .get(name)
            .map(|e| e.bdev.clone())
    }

    /// Every bdev with its declaration and its users, by name.
    pub fn list(&self) -> Vec<(Arc<dyn Bdev>, BdevDecl, Vec<String>)> {
        let e = self.entries.lock().expect("registry lock");
        e.values()
            .map(|x| {
                let mut users = x.claims.clone();
                users.extend(
                    e.values()
                        .filter(|o| o.decl.stacks_on(x.decl.name()))
                        .map(|o| format!("bdev {}", o.decl.name())),
                );
                (x.bdev.clone(), x.decl.clone(), users)
            })
            .collect()
    }

    /// Marks `name` as used by `user` (an export); deletion is refused until released.
    pub fn claim(&self, name: &str, user: &str) -> Result<Arc<dyn Bdev>, BdevError> {
        let mut e = self.entries.lock().expect("registry lock");
        let x = e
            .get_mut(name)
            .ok_or_else(|| BdevError::NotFound(name.into()))?;
        x.claims.push(user.to_string());
        Ok(x.bdev.clone())
    }

    /// Drops a claim made by [`BdevRegistry::claim`].
    pub fn release(&self, name: &str, user: &str) {
        if let Some(x) = self.entries.lock().expect("registry lock").get_mut(name)
            && let Some(i) = x.claims.iter().position(|c| c == user)
        {
            x.claims.remove(i);
        }
    }

    /// Deletes a bdev no one uses.
    pub fn delete(&self, name: &str) -> Result<(), BdevError> {
        let mut e = self.entries.lock().expect("registry lock");
        let x = e
            .get(name)
            .ok_or_else(|| BdevError::NotFound(name.into()))?;
        let mut users = x.claims.clone();
        users.extend(
            e.values()
                .filter(|o| o.decl.stacks_on(name))
                .map(|o| format!("bdev {}", o.decl.name())),
        );
        if x.bdev.info().open_channels() > 0 && users.is_empty() {
            users.push(format!("{} open channel(s)", x.bdev.info().open_channels()));
        }
        if !users.is_empty() {
            return Err(BdevError::InUse {
                name: name.into(),
                users: users.join(", "),
            });
        }
        e.remove(name);
        tracing::info!(bdev = %name, "bdev deleted");
        Ok(())
    }

    /// Adds bdev `base` to the bases of `name` at run time (a mirror's new or returning
    /// child); the declaration follows. Returns what the bdev reports.
    pub fn add_base(&self, name: &str, base: &str) -> Result<serde_json::Value, BdevError> {
        let (b, child) = {
            let e = self.entries.lock().expect("registry lock");
            let b = e
                .get(name)
                .ok_or_else(|| BdevError::NotFound(name.into()))?;
            let c = e
                .get(base)
                .ok_or_else(|| BdevError::invalid("child", format!("no bdev named '{base}'")))?;
            (b.bdev.clone(), c.bdev.clone())
        };
        if stacks_on(&child, name) {
            return Err(BdevError::invalid(
                "child",
                format!("'{base}' is stacked on '{name}': that would be a cycle"),
            ));
        }
        let v = b.add_base(child)?;
        self.follow_bases(name, &b);
        Ok(v)
    }

    /// Removes bdev `base` from the bases of `name` at run time; the declaration follows.
    pub fn remove_base(&self, name: &str, base: &str) -> Result<serde_json::Value, BdevError> {
        let b = self
            .get(name)
            .ok_or_else(|| BdevError::NotFound(name.into()))?;
        let v = b.remove_base(base)?;
        self.follow_bases(name, &b);
        Ok(v)
    }

    fn follow_bases(&self, name: &str, b: &Arc<dyn Bdev>) {
        let names: Vec<String> = b
            .bases()
            .iter()
            .map(|x| x.info().name().to_string())
            .collect();
        if let Some(x) = self.entries.lock().expect("registry lock").get_mut(name) {
            x.decl.set_bases(&names);
        }
    }

    /// The declaration of `name` as it is now.
    pub fn decl(&self, name: &str) -> Option<BdevDecl> {
        self.entries
            .lock()
            .expect("registry lock")
            .get(name)
            .map(|e| e.decl.clone())
    }

    /// Resizes a bdev to `size` bytes (a multiple of its block size).
    pub fn resize(&self, name: &str, size: u64) -> Result<(), BdevError> {
        let b = self
            .get(name)
            .ok_or_else(|| BdevError::NotFound(name.into()))?;
        let bs = u64::from(b.info().block_size().bytes());
        if size == 0 || !size.is_multiple_of(bs) {
            return Err(BdevError::invalid(
                "size",
                format!("{size} bytes is not a positive multiple of block_size {bs}"),
            ));
        }
        b.resize(size / bs)
    }

    /// Every bdev, bases after the bdevs stacked on them (the order to flush and close them).
    pub fn top_down(&self) -> Vec<Arc<dyn Bdev>> {
        let list = self.list();
        let decls: Vec<&BdevDecl> = list.iter().map(|(_, d, _)| d).collect();
        match creation_order(&decls, &|_| false) {
            Ok(order) => order.iter().rev().map(|&i| list[i].0.clone()).collect(),
            Err(_) => list.into_iter().map(|(b, _, _)| b).collect(),
        }
    }
}

/// Whether `b` is `name` or stacked on it, through any chain of bases.
fn stacks_on(b: &Arc<dyn Bdev>, name: &str) -> bool {
    b.info().name() == name || b.bases().iter().any(|x| stacks_on(x, name))
}
