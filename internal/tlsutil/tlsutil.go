// Package tlsutil is kmsd's TLS: a local CA and server certificate made
// under the data dir for the embedded default, certificates served through
// GetCertificate so that a SIGHUP reload swaps them without a restart, and
// a TLS 1.3 configuration whose key exchange is the hybrid post-quantum
// X25519MLKEM768 first, classical X25519 as the fallback.
package tlsutil

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"io/fs"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"slices"
	"sync/atomic"
	"time"

	"github.com/kmsd-project/kmsd/internal/fileutil"
)

// CurvePreferences is the key exchange kmsd offers, in order: the hybrid
// post-quantum group (Go's default first choice), then classical X25519 for
// clients that lack it. Nothing else.
var CurvePreferences = []tls.CurveID{tls.X25519MLKEM768, tls.X25519}

// LocalHosts are the names the local server certificate is for.
var LocalHosts = []string{"localhost", "127.0.0.1", "::1"}

// Local is what EnsureLocal made or found under a directory.
type Local struct {
	CA, CAKey, Cert, Key string // file paths
	Issued               bool   // a server certificate was issued now
	CreatedCA            bool
}

const (
	caValidity     = 10 * 365 * 24 * time.Hour
	serverValidity = 397 * 24 * time.Hour
	renewBefore    = 30 * 24 * time.Hour
)

// EnsureLocal makes, on first use, a local CA (ca.pem, ca-key.pem 0600) and
// a server certificate for hosts (server.pem, server-key.pem 0600) under
// dir. Later it reuses them, and issues a new server certificate from the
// same CA when the old one expires within 30 days or lacks a host.
func EnsureLocal(dir string, hosts []string, now time.Time) (Local, error) {
	l := Local{CA: filepath.Join(dir, "ca.pem"), CAKey: filepath.Join(dir, "ca-key.pem"), Cert: filepath.Join(dir, "server.pem"), Key: filepath.Join(dir, "server-key.pem")}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return l, err
	}
	caCert, caKey, err := loadCA(l.CA, l.CAKey)
	if errors.Is(err, fs.ErrNotExist) {
		if caCert, caKey, err = newCA(l.CA, l.CAKey, now); err != nil {
			return l, fmt.Errorf("make the local CA: %w", err)
		}
		l.CreatedCA = true
	} else if err != nil {
		return l, fmt.Errorf("local CA in %s: %w", dir, err)
	}
	if serverCertOK(l.Cert, l.Key, caCert, hosts, now) {
		return l, nil
	}
	if err := issueServer(l.Cert, l.Key, caCert, caKey, hosts, now); err != nil {
		return l, fmt.Errorf("issue the local server certificate: %w", err)
	}
	l.Issued = true
	return l, nil
}

func serial() (*big.Int, error) {
	return rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
}

func writeKey(path string, k *ecdsa.PrivateKey) error {
	der, err := x509.MarshalPKCS8PrivateKey(k)
	if err != nil {
		return err
	}
	return fileutil.WriteAtomic(path, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}), 0o600)
}

func writeCert(path string, der []byte) error {
	return fileutil.WriteAtomic(path, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o644)
}

func newCA(certPath, keyPath string, now time.Time) (*x509.Certificate, *ecdsa.PrivateKey, error) {
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, err
	}
	sn, err := serial()
	if err != nil {
		return nil, nil, err
	}
	tmpl := &x509.Certificate{
		SerialNumber: sn, Subject: pkix.Name{CommonName: "kmsd local CA"},
		NotBefore: now.Add(-time.Hour), NotAfter: now.Add(caValidity),
		IsCA: true, BasicConstraintsValid: true, MaxPathLenZero: true,
		KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &k.PublicKey, k)
	if err != nil {
		return nil, nil, err
	}
	// The key first: a CA certificate without its key would be useless.
	if err := writeKey(keyPath, k); err != nil {
		return nil, nil, err
	}
	if err := writeCert(certPath, der); err != nil {
		return nil, nil, err
	}
	c, err := x509.ParseCertificate(der)
	return c, k, err
}

func loadCA(certPath, keyPath string) (*x509.Certificate, *ecdsa.PrivateKey, error) {
	pair, err := tls.LoadX509KeyPair(certPath, keyPath)
	if err != nil {
		if _, e1 := os.Stat(certPath); errors.Is(e1, fs.ErrNotExist) {
			if _, e2 := os.Stat(keyPath); errors.Is(e2, fs.ErrNotExist) {
				return nil, nil, fs.ErrNotExist
			}
		}
		return nil, nil, err
	}
	k, ok := pair.PrivateKey.(*ecdsa.PrivateKey)
	if !ok {
		return nil, nil, errors.New("the CA key is not an ECDSA key")
	}
	c, err := x509.ParseCertificate(pair.Certificate[0])
	if err != nil {
		return nil, nil, err
	}
	if !c.IsCA {
		return nil, nil, errors.New("ca.pem is not a CA certificate")
	}
	return c, k, nil
}

// serverCertOK reports whether the server certificate exists, matches its
// key, chains to ca, names every host and stays valid beyond renewBefore.
func serverCertOK(certPath, keyPath string, ca *x509.Certificate, hosts []string, now time.Time) bool {
	pair, err := tls.LoadX509KeyPair(certPath, keyPath)
	if err != nil {
		return false
	}
	c, err := x509.ParseCertificate(pair.Certificate[0])
	if err != nil || now.Add(renewBefore).After(c.NotAfter) || c.CheckSignatureFrom(ca) != nil {
		return false
	}
	for _, h := range hosts {
		if c.VerifyHostname(h) != nil {
			return false
		}
	}
	return true
}

func issueServer(certPath, keyPath string, ca *x509.Certificate, caKey *ecdsa.PrivateKey, hosts []string, now time.Time) error {
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return err
	}
	sn, err := serial()
	if err != nil {
		return err
	}
	tmpl := &x509.Certificate{
		SerialNumber: sn, Subject: pkix.Name{CommonName: "kmsd"},
		NotBefore: now.Add(-time.Hour), NotAfter: now.Add(serverValidity),
		KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	for _, h := range hosts {
		if ip := net.ParseIP(h); ip != nil {
			tmpl.IPAddresses = append(tmpl.IPAddresses, ip)
		} else if !slices.Contains(tmpl.DNSNames, h) {
			tmpl.DNSNames = append(tmpl.DNSNames, h)
		}
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, &k.PublicKey, caKey)
	if err != nil {
		return err
	}
	if err := writeKey(keyPath, k); err != nil {
		return err
	}
	return writeCert(certPath, der)
}

// Reloader serves a certificate pair from files and reloads it on demand
// (SIGHUP): a failed reload keeps the pair in use.
type Reloader struct {
	cert, key string
	cur       atomic.Pointer[tls.Certificate]
}

// NewReloader loads the pair once; an error names the files.
func NewReloader(certFile, keyFile string) (*Reloader, error) {
	r := &Reloader{cert: certFile, key: keyFile}
	return r, r.Reload()
}

// Reload reads the files again.
func (r *Reloader) Reload() error {
	pair, err := tls.LoadX509KeyPair(r.cert, r.key)
	if err != nil {
		return fmt.Errorf("TLS certificate %s / key %s: %w", r.cert, r.key, err)
	}
	r.cur.Store(&pair)
	return nil
}

// Leaf is the certificate in use.
func (r *Reloader) Leaf() *x509.Certificate {
	c := r.cur.Load()
	if c == nil {
		return nil
	}
	if c.Leaf != nil {
		return c.Leaf
	}
	l, _ := x509.ParseCertificate(c.Certificate[0])
	return l
}

// GetCertificate is for tls.Config.
func (r *Reloader) GetCertificate(*tls.ClientHelloInfo) (*tls.Certificate, error) {
	return r.cur.Load(), nil
}

// LoadPool reads PEM certificates into a pool.
func LoadPool(file string) (*x509.CertPool, error) {
	b, err := os.ReadFile(file)
	if err != nil {
		return nil, err
	}
	p := x509.NewCertPool()
	if !p.AppendCertsFromPEM(b) {
		return nil, fmt.Errorf("%s holds no PEM certificate", file)
	}
	return p, nil
}

// ServerConfig is TLS 1.3 only with CurvePreferences, the certificate from
// r. With clientCAs set, every connection must present a client
// certificate chained to them; refused is called (with the client's address
// and the reason) for each connection refused for that, before any request
// is read.
func ServerConfig(r *Reloader, clientCAs *x509.CertPool, refused func(remote, reason string)) *tls.Config {
	base := &tls.Config{
		MinVersion:       tls.VersionTLS13,
		CurvePreferences: CurvePreferences,
		GetCertificate:   r.GetCertificate,
	}
	if clientCAs == nil {
		return base
	}
	// The certificate is requested, not required, so that a client
	// without one reaches VerifyConnection and its refusal is recorded.
	base.ClientAuth = tls.RequestClientCert
	base.GetConfigForClient = func(hello *tls.ClientHelloInfo) (*tls.Config, error) {
		c := base.Clone()
		c.GetConfigForClient = nil
		remote := ""
		if hello.Conn != nil {
			remote = hello.Conn.RemoteAddr().String()
		}
		c.VerifyConnection = func(cs tls.ConnectionState) error {
			err := VerifyClient(cs, clientCAs)
			if err != nil && refused != nil {
				refused(remote, err.Error())
			}
			return err
		}
		return c, nil
	}
	return base
}

// VerifyClient checks that the connection's client certificate chains to
// roots for client authentication.
func VerifyClient(cs tls.ConnectionState, roots *x509.CertPool) error {
	if len(cs.PeerCertificates) == 0 {
		return errors.New("no client certificate (mutual TLS is required)")
	}
	inter := x509.NewCertPool()
	for _, c := range cs.PeerCertificates[1:] {
		inter.AddCert(c)
	}
	_, err := cs.PeerCertificates[0].Verify(x509.VerifyOptions{Roots: roots, Intermediates: inter, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}})
	if err != nil {
		return errors.New("the client certificate does not chain to --tls-client-ca")
	}
	return nil
}

// IsLoopback reports whether a listen address's host is a loopback address
// (or "localhost"); an empty host or 0.0.0.0 listens on every interface.
func IsLoopback(addr string) bool {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return false
	}
	if host == "localhost" {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}
