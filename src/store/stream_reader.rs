//! A consumer's own connection for its stream reads (`XREADGROUP`,
//! `XAUTOCLAIM`), with a small RESP2 reader of its own.
//!
//! Why not redis-rs here: its general reply parser (built on `combine`) was
//! about a third of the workers' CPU in the profile, nearly all of it on
//! stream entries (an event is some fifteen values). This reader parses a
//! reply straight from the socket's buffer into `redis::Value`, so the
//! consumer loop reads deliveries exactly as before. Everything else still
//! goes through redis-rs.

use std::time::Duration;

use redis::{ConnectionAddr, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::{StoreError, StoreResult};

/// Largest reply accepted: a read of `WORKER_READ_COUNT_MAX` entries stays
/// far below it; past it the connection is dropped rather than grown.
const REPLY_SIZE_MAX_BYTES: usize = 64 * 1024 * 1024;
/// Deepest nesting of arrays accepted; stream replies nest four deep.
const REPLY_DEPTH_MAX: usize = 8;
/// Bytes asked of the socket per read.
const READ_CHUNK_BYTES: usize = 64 * 1024;

pub struct StreamReader {
    socket: TcpStream,
    /// Bytes read but not yet parsed.
    buffer: Vec<u8>,
    /// Bound on connecting and on each reply, beyond any `BLOCK` it asked for.
    timeout: Duration,
}

impl StreamReader {
    /// Connects to the Redis of `client` (TCP only: `None` for a TLS or Unix
    /// socket address, which the caller serves through redis-rs instead),
    /// authenticates and selects the database as the URL says.
    pub async fn connect(
        client: &redis::Client,
        timeout: Duration,
    ) -> StoreResult<Option<StreamReader>> {
        let info = client.get_connection_info();
        let ConnectionAddr::Tcp(host, port) = info.addr() else {
            return Ok(None);
        };
        let socket = tokio::time::timeout(timeout, TcpStream::connect((host.as_str(), *port)))
            .await
            .map_err(|_| io_error("connecting timed out"))?
            .map_err(|err| io_error(&err.to_string()))?;
        socket
            .set_nodelay(true)
            .map_err(|err| io_error(&err.to_string()))?;
        let mut reader = StreamReader {
            socket,
            buffer: Vec::with_capacity(READ_CHUNK_BYTES),
            timeout,
        };
        let settings = info.redis_settings();
        if let Some(password) = settings.password() {
            match settings.username() {
                Some(user) => reader.command(&["AUTH", user, password], 0).await?,
                None => reader.command(&["AUTH", password], 0).await?,
            };
        }
        if settings.db() != 0 {
            let db = settings.db().to_string();
            reader.command(&["SELECT", &db], 0).await?;
        }
        Ok(Some(reader))
    }

    /// Sends one command and reads its reply, waiting at most `block_ms`
    /// (the command's own `BLOCK`) plus the timeout.
    pub async fn command(&mut self, args: &[&str], block_ms: u64) -> StoreResult<Value> {
        let mut request = format!("*{}\r\n", args.len()).into_bytes();
        for arg in args {
            request.extend_from_slice(format!("${}\r\n", arg.len()).as_bytes());
            request.extend_from_slice(arg.as_bytes());
            request.extend_from_slice(b"\r\n");
        }
        let wait = self.timeout + Duration::from_millis(block_ms);
        tokio::time::timeout(wait, self.exchange(&request))
            .await
            .map_err(|_| io_error("reply timed out"))?
    }

    async fn exchange(&mut self, request: &[u8]) -> StoreResult<Value> {
        self.socket
            .write_all(request)
            .await
            .map_err(|err| io_error(&err.to_string()))?;
        loop {
            if let Some((value, used)) = parse(&self.buffer, 0)? {
                self.buffer.drain(..used);
                return match value {
                    Parsed::Value(value) => Ok(value),
                    Parsed::Error(message) => Err(StoreError::Redis(redis::RedisError::from((
                        redis::ErrorKind::Extension,
                        "redis answered an error",
                        message,
                    )))),
                };
            }
            if self.buffer.len() > REPLY_SIZE_MAX_BYTES {
                return Err(io_error("reply larger than REPLY_SIZE_MAX_BYTES"));
            }
            let start = self.buffer.len();
            self.buffer.resize(start + READ_CHUNK_BYTES, 0);
            let read = self
                .socket
                .read(&mut self.buffer[start..])
                .await
                .map_err(|err| io_error(&err.to_string()));
            self.buffer.truncate(start + *read.as_ref().unwrap_or(&0));
            if read? == 0 {
                return Err(io_error("redis closed the connection"));
            }
        }
    }
}

/// A consumer's connection for its stream reads: a [`StreamReader`] over
/// TCP, or a pooled redis-rs connection for the addresses it does not speak
/// (TLS, Unix sockets).
pub enum StreamConnection {
    Own(StreamReader),
    Pooled(deadpool_redis::Connection),
}

impl StreamConnection {
    /// Runs one command (`args[0]` is its name), waiting at most `block_ms`
    /// more than the usual timeout for its reply.
    pub async fn query(&mut self, args: &[&str], block_ms: u64) -> StoreResult<Value> {
        match self {
            StreamConnection::Own(reader) => reader.command(args, block_ms).await,
            StreamConnection::Pooled(conn) => {
                let Some((name, rest)) = args.split_first() else {
                    return Err(io_error("no command given"));
                };
                let mut command = redis::cmd(name);
                for arg in rest {
                    command.arg(*arg);
                }
                Ok(command.query_async(conn).await?)
            }
        }
    }
}

fn io_error(message: &str) -> StoreError {
    StoreError::Redis(redis::RedisError::from(std::io::Error::other(
        message.to_owned(),
    )))
}

/// One parsed reply: a value, or the error Redis answered.
#[derive(Debug, PartialEq)]
enum Parsed {
    Value(Value),
    Error(String),
}

/// Parses one RESP2 reply from the start of `bytes`: `None` while it is
/// incomplete, else the reply and the bytes it took.
fn parse(bytes: &[u8], depth: usize) -> StoreResult<Option<(Parsed, usize)>> {
    if depth > REPLY_DEPTH_MAX {
        return Err(io_error("reply nested deeper than REPLY_DEPTH_MAX"));
    }
    let Some(line_end) = bytes.windows(2).position(|pair| pair == b"\r\n") else {
        return Ok(None);
    };
    let Some((&kind, line)) = bytes[..line_end].split_first() else {
        return Err(io_error("empty reply line"));
    };
    let text = std::str::from_utf8(line).map_err(|_| io_error("reply line is not text"))?;
    let after_line = line_end + 2;
    let number = || {
        text.parse::<i64>()
            .map_err(|_| io_error("bad length in reply"))
    };
    match kind {
        b'+' => Ok(Some((
            Parsed::Value(Value::SimpleString(text.to_owned())),
            after_line,
        ))),
        b'-' => Ok(Some((Parsed::Error(text.to_owned()), after_line))),
        b':' => Ok(Some((Parsed::Value(Value::Int(number()?)), after_line))),
        b'$' => {
            let Ok(length) = usize::try_from(number()?) else {
                return Ok(Some((Parsed::Value(Value::Nil), after_line))); // $-1
            };
            let end = after_line + length;
            if bytes.len() < end + 2 {
                return Ok(None);
            }
            let value = Value::BulkString(bytes[after_line..end].to_vec());
            Ok(Some((Parsed::Value(value), end + 2)))
        }
        b'*' => {
            let Ok(count) = usize::try_from(number()?) else {
                return Ok(Some((Parsed::Value(Value::Nil), after_line))); // *-1
            };
            // Every element takes at least 3 bytes: a count beyond what the
            // buffer could ever hold is corrupt, not incomplete.
            if count > REPLY_SIZE_MAX_BYTES / 3 {
                return Err(io_error("array longer than a reply may be"));
            }
            let mut items = Vec::with_capacity(count.min(bytes.len() / 3));
            let mut at = after_line;
            for _ in 0..count {
                match parse(&bytes[at..], depth + 1)? {
                    Some((Parsed::Value(item), used)) => {
                        items.push(item);
                        at += used;
                    }
                    Some((Parsed::Error(message), _)) => {
                        return Err(io_error(&format!("error inside a reply: {message}")));
                    }
                    None => return Ok(None),
                }
            }
            Ok(Some((Parsed::Value(Value::Array(items)), at)))
        }
        _ => Err(io_error("unknown reply type")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(text: &str) -> Value {
        Value::BulkString(text.as_bytes().to_vec())
    }

    fn parsed(bytes: &[u8]) -> Option<(Parsed, usize)> {
        parse(bytes, 0).unwrap()
    }

    #[test]
    fn a_stream_read_parses_whole_and_waits_while_incomplete() {
        let reply = b"*1\r\n*2\r\n$6\r\nsettle\r\n*2\r\n*2\r\n$3\r\n1-0\r\n*4\r\n$8\r\nbatch_id\r\n$2\r\nb1\r\n$7\r\nattempt\r\n$1\r\n2\r\n*2\r\n$3\r\n2-0\r\n*-1\r\n";
        let expected = Value::Array(vec![Value::Array(vec![
            bulk("settle"),
            Value::Array(vec![
                Value::Array(vec![
                    bulk("1-0"),
                    Value::Array(vec![
                        bulk("batch_id"),
                        bulk("b1"),
                        bulk("attempt"),
                        bulk("2"),
                    ]),
                ]),
                Value::Array(vec![bulk("2-0"), Value::Nil]),
            ]),
        ])]);
        assert_eq!(parsed(reply), Some((Parsed::Value(expected), reply.len())));
        for cut in 0..reply.len() {
            assert_eq!(parsed(&reply[..cut]), None, "cut at {cut}");
        }
        let mut two = reply.to_vec();
        two.extend_from_slice(b":5\r\n");
        assert_eq!(
            parsed(&two).unwrap().1,
            reply.len(),
            "only the first reply is taken"
        );
    }

    #[test]
    fn scalars_nils_and_errors() {
        assert_eq!(parsed(b"*-1\r\n"), Some((Parsed::Value(Value::Nil), 5)));
        assert_eq!(parsed(b"$-1\r\n"), Some((Parsed::Value(Value::Nil), 5)));
        assert_eq!(parsed(b":-3\r\n"), Some((Parsed::Value(Value::Int(-3)), 5)));
        assert_eq!(
            parsed(b"+OK\r\n"),
            Some((Parsed::Value(Value::SimpleString("OK".into())), 5))
        );
        assert_eq!(
            parsed(b"-NOGROUP no such group\r\n"),
            Some((Parsed::Error("NOGROUP no such group".into()), 24))
        );
        // A value may hold CR LF: its length, not a line end, bounds it.
        assert_eq!(
            parsed(b"$4\r\na\r\nb\r\n"),
            Some((Parsed::Value(bulk("a\r\nb")), 10))
        );
    }

    #[test]
    fn corrupt_replies_are_refused() {
        assert!(parse(b"?1\r\n", 0).is_err());
        assert!(parse(b"$x\r\n", 0).is_err());
        assert!(parse(b"*99999999999\r\n", 0).is_err());
        assert!(parse(b"*1\r\n-ERR inside\r\n", 0).is_err());
        let deep = "*1\r\n".repeat(REPLY_DEPTH_MAX + 2) + ":1\r\n";
        assert!(parse(deep.as_bytes(), 0).is_err());
    }
}
