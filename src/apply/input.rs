//! Reading `apply`'s inputs: regular files or standard input, each at most a given size.
//!
//! A FIFO, a device or a directory is refused before anything is read (a FIFO is opened non-blocking, so a
//! missing writer cannot hang the command), and at most `max_bytes + 1` bytes are ever read, so `/dev/zero` or
//! an endless pipe on standard input fails fast instead of filling memory.

use std::{
    fs::FileType,
    io::Read,
    os::unix::fs::{FileTypeExt, OpenOptionsExt},
    path::Path,
};

use super::Input;

/// The default of `--max-input-bytes`: 16 MiB per input.
pub const DEFAULT_MAX_BYTES: u64 = 16 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("{name}: {source}")]
    Io { name: String, source: std::io::Error },
    #[error("{name}: not a regular file but {what}; pass a file, or \"-\" for standard input")]
    NotARegularFile { name: String, what: &'static str },
    #[error("{name}: larger than {max_bytes} bytes (raise the limit with --max-input-bytes)")]
    TooLarge { name: String, max_bytes: u64 },
    #[error("{name}: not UTF-8 text")]
    NotText { name: String },
}

fn describe(file_type: FileType) -> &'static str {
    if file_type.is_dir() {
        "a directory"
    } else if file_type.is_fifo() {
        "a FIFO"
    } else if file_type.is_char_device() {
        "a character device"
    } else if file_type.is_block_device() {
        "a block device"
    } else if file_type.is_socket() {
        "a socket"
    } else {
        "not a file"
    }
}

/// Reads a regular file (symbolic links followed) of at most `max_bytes`.
pub fn read_file(path: &Path, max_bytes: u64) -> Result<Input, ReadError> {
    let name = path.display().to_string();
    let io = |source| ReadError::Io {
        name: name.clone(),
        source,
    };
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(io)?;
    let meta = file.metadata().map_err(io)?;
    if !meta.file_type().is_file() {
        return Err(ReadError::NotARegularFile {
            name,
            what: describe(meta.file_type()),
        });
    }
    if meta.len() > max_bytes {
        return Err(ReadError::TooLarge { name, max_bytes });
    }
    read_bounded(name, file, max_bytes)
}

/// Reads standard input, at most `max_bytes` of it.
pub fn read_stdin(max_bytes: u64) -> Result<Input, ReadError> {
    read_bounded("-".into(), std::io::stdin().lock(), max_bytes)
}

/// Reads at most `max_bytes + 1` bytes: one more than allowed tells that the input is too large.
fn read_bounded(name: String, reader: impl Read, max_bytes: u64) -> Result<Input, ReadError> {
    let mut bytes = Vec::new();
    reader
        .take(max_bytes.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(|source| ReadError::Io {
            name: name.clone(),
            source,
        })?;
    if bytes.len() as u64 > max_bytes {
        return Err(ReadError::TooLarge { name, max_bytes });
    }
    match String::from_utf8(bytes) {
        Ok(text) => Ok(Input { name, text }),
        Err(_) => Err(ReadError::NotText { name }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reader_of_exactly_the_limit_is_accepted_and_one_more_byte_is_refused() {
        let input = read_bounded("x".into(), &b"abcd"[..], 4).unwrap();
        assert_eq!(input.text, "abcd");
        let err = read_bounded("x".into(), &b"abcde"[..], 4).unwrap_err();
        assert!(matches!(err, ReadError::TooLarge { max_bytes: 4, .. }), "{err}");
    }

    #[test]
    fn endless_reader_stops_after_the_limit() {
        let err = read_bounded("zero".into(), std::io::repeat(0), 1 << 10).unwrap_err();
        assert_eq!(
            err.to_string(),
            "zero: larger than 1024 bytes (raise the limit with --max-input-bytes)"
        );
    }

    #[test]
    fn directory_and_device_are_not_regular_files() {
        let err = read_file(Path::new("/"), 1 << 20).unwrap_err();
        assert_eq!(
            err.to_string(),
            "/: not a regular file but a directory; pass a file, or \"-\" for standard input"
        );
        let err = read_file(Path::new("/dev/zero"), 1 << 20).unwrap_err();
        assert!(matches!(
            err,
            ReadError::NotARegularFile {
                what: "a character device",
                ..
            }
        ));
    }

    #[test]
    fn invalid_utf8_is_refused() {
        let err = read_bounded("bin".into(), &[0xff, 0xfe][..], 10).unwrap_err();
        assert_eq!(err.to_string(), "bin: not UTF-8 text");
    }
}
