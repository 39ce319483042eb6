//! TLS for `rediss://` hosts (feature `tls`): rustls over the same
//! non-blocking `mio` socket, driven by the same event loop.
//!
//! The handshake needs no loop of its own: the connection's first bytes
//! (the Redis handshake and requests) are handed to rustls, which holds them
//! until the TLS handshake is done, while reads and writes of TLS records
//! happen as the socket becomes readable and writable.

use std::io::{self, Read, Write};
use std::sync::Arc;

use mio::net::TcpStream;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{
    ClientConfig, ClientConnection, DigitallySignedStruct, RootCertStore, SignatureScheme,
};

use crate::config::HostInfo;
use crate::error::{Error, Result};

fn tls_error(host: &HostInfo, reason: impl std::fmt::Display) -> Error {
    Error::Tls {
        host: host.name().clone(),
        reason: reason.to_string().into(),
    }
}

/// The rustls configuration of a host: its CA file (or the web roots), its
/// client certificate, or no verification at all (tests only).
pub(crate) fn client_config(host: &HostInfo) -> Result<Arc<ClientConfig>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| tls_error(host, e))?;
    let options = &host.tls_options;
    let builder = if options.insecure_skip_verify {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAnyCertificate(provider)))
    } else {
        let mut roots = RootCertStore::empty();
        match &options.ca_file {
            Some(path) => {
                let certs = CertificateDer::pem_file_iter(path)
                    .map_err(|e| tls_error(host, format!("CA file {}: {e}", path.display())))?;
                for cert in certs {
                    let cert = cert
                        .map_err(|e| tls_error(host, format!("CA file {}: {e}", path.display())))?;
                    roots
                        .add(cert)
                        .map_err(|e| tls_error(host, format!("CA file {}: {e}", path.display())))?;
                }
            }
            None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
        }
        builder.with_root_certificates(roots)
    };
    let config = match &options.client_cert {
        Some((cert_path, key_path)) => {
            let chain = CertificateDer::pem_file_iter(cert_path)
                .and_then(|certs| certs.collect::<std::result::Result<Vec<_>, _>>())
                .map_err(|e| {
                    tls_error(
                        host,
                        format!("client certificate {}: {e}", cert_path.display()),
                    )
                })?;
            let key = PrivateKeyDer::from_pem_file(key_path)
                .map_err(|e| tls_error(host, format!("client key {}: {e}", key_path.display())))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| tls_error(host, e))?
        }
        None => builder.with_no_client_auth(),
    };
    Ok(Arc::new(config))
}

/// A TLS session over a non-blocking TCP socket.
pub(crate) struct TlsStream {
    sock: TcpStream,
    tls: ClientConnection,
}

impl TlsStream {
    /// Starts a client session (the handshake runs as the socket is driven).
    pub(crate) fn new(
        host: &HostInfo,
        config: Arc<ClientConfig>,
        sock: TcpStream,
    ) -> Result<TlsStream> {
        let name = host
            .tls_options
            .server_name
            .clone()
            .unwrap_or_else(|| host.host.clone());
        let server_name = ServerName::try_from(name.clone())
            .map_err(|e| tls_error(host, format!("bad server name {name:?}: {e}")))?;
        let mut tls = ClientConnection::new(config, server_name).map_err(|e| tls_error(host, e))?;
        // Our own write buffer bounds what is queued; rustls need not.
        tls.set_buffer_limit(None);
        Ok(TlsStream { sock, tls })
    }

    pub(crate) fn socket(&mut self) -> &mut TcpStream {
        &mut self.sock
    }

    pub(crate) fn socket_ref(&self) -> &TcpStream {
        &self.sock
    }

    /// The TLS handshake is not finished yet.
    pub(crate) fn is_handshaking(&self) -> bool {
        self.tls.is_handshaking()
    }

    /// TLS records are waiting to be written.
    pub(crate) fn wants_write(&self) -> bool {
        self.tls.wants_write()
    }

    /// Writes pending TLS records until done or the socket would block.
    pub(crate) fn flush(&mut self) -> io::Result<bool> {
        while self.tls.wants_write() {
            match self.tls.write_tls(&mut self.sock) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(true)
    }

    /// Hands plaintext to rustls (it always takes all of it) and sends
    /// what it can.
    pub(crate) fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.tls.writer().write(buf)?;
        // Taken is sent: once rustls holds the bytes, they may reach the
        // server, so they must not be resent on another connection. A
        // socket failure now shows on the next flush.
        let _ = self.flush();
        Ok(n)
    }

    /// Reads plaintext: decrypts what is buffered, reading TLS records
    /// from the socket as needed. `WouldBlock` when nothing is ready.
    pub(crate) fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            match self.tls.reader().read(buf) {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
            match self.tls.read_tls(&mut self.sock) {
                Ok(0) => return Ok(0),
                Ok(_) => {
                    let state = self.tls.process_new_packets();
                    // Alerts and handshake replies go out whatever happened.
                    let _ = self.flush();
                    state.map_err(|e| {
                        io::Error::new(io::ErrorKind::InvalidData, TlsFailure(e.to_string()))
                    })?;
                }
                Err(e) => return Err(e),
            }
        }
    }
}

/// A rustls failure carried through `io::Error`, so the connection can
/// report it as [`Error::Tls`].
#[derive(Debug)]
pub(crate) struct TlsFailure(pub(crate) String);

impl std::fmt::Display for TlsFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for TlsFailure {}

/// `insecure_skip_verify`: accepts any certificate, still checking that the
/// handshake signatures are valid. For tests against self-signed servers.
#[derive(Debug)]
struct AcceptAnyCertificate(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AcceptAnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
