//! Reading raw parse trees: the utility hook and its checks look at
//! statements before PostgreSQL runs them.

use std::ffi::CStr;

use pgrx::pg_sys;

/// The pointers a `List` holds (none for a NULL list).
///
/// # Safety
/// `list` must be NULL or point to a valid pointer List.
pub(super) unsafe fn list_items(list: *mut pg_sys::List) -> Vec<*mut std::ffi::c_void> {
    if list.is_null() {
        return Vec::new();
    }
    (0..(*list).length as usize)
        .map(|i| (*(*list).elements.add(i)).ptr_value)
        .collect()
}

/// A C string of the tree as text (empty for NULL).
///
/// # Safety
/// `s` must be NULL or point to a NUL-terminated string.
pub(super) unsafe fn text(s: *const std::ffi::c_char) -> String {
    if s.is_null() {
        return String::new();
    }
    CStr::from_ptr(s).to_string_lossy().into_owned()
}
