//! The JSON Patch being built: `add` operations only, an array created when
//! the pod has none or appended to when it has one.

use json_patch::jsonptr::PointerBuf;
use json_patch::{AddOperation, PatchOperation};
use serde::Serialize;
use serde_json::Value;

#[derive(Default)]
pub(super) struct Ops(pub(super) Vec<PatchOperation>);

impl Ops {
    pub(super) fn add(&mut self, path: &[&str], value: Value) {
        self.0.push(PatchOperation::Add(AddOperation {
            path: PointerBuf::from_tokens(path.iter().copied()),
            value,
        }));
    }

    /// Appends `items` to the array at `path`, or creates it when absent.
    pub(super) fn append_all<T: Serialize>(
        &mut self,
        path: &[&str],
        exists: bool,
        items: &[T],
    ) -> Result<(), String> {
        if exists {
            let mut at: Vec<&str> = path.to_vec();
            at.push("-");
            for item in items {
                self.add(&at, to_value(item)?);
            }
        } else {
            self.add(path, to_value(items)?);
        }
        Ok(())
    }
}

pub(super) fn to_value<T: Serialize + ?Sized>(v: &T) -> Result<Value, String> {
    serde_json::to_value(v).map_err(|e| format!("internal error: {e}"))
}
