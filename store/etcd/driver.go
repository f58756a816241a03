package etcd

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"net/url"
	"strings"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/kmsd-project/kmsd/internal/tlsutil"
	"github.com/kmsd-project/kmsd/kms"
	"github.com/kmsd-project/kmsd/store"
)

// The replicated store: an etcd cluster that several kmsd share.
func init() { store.Register("etcd", driver{}) }

type driver struct{}

// Check checks the cluster's endpoints and TLS files.
func (driver) Check(cfg store.Config) error {
	e := cfg.Etcd
	if len(e.Endpoints) == 0 {
		return errors.New("--store etcd needs --etcd-endpoints (comma-separated URLs of the cluster's members, e.g. https://10.0.0.1:2379)")
	}
	for i, ep := range e.Endpoints {
		u, err := url.Parse(ep)
		if err == nil && u.User != nil {
			// Not echoed: the URL holds a password, which must not reach
			// a log or an error message.
			return fmt.Errorf("--etcd-endpoints: endpoint %d carries credentials; kmsd authenticates to etcd with --etcd-cert/--etcd-key only", i+1)
		}
		if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" || (u.Path != "" && u.Path != "/") || u.RawQuery != "" || u.Fragment != "" {
			return fmt.Errorf("--etcd-endpoints: %q is not an http:// or https:// URL of a member", ep)
		}
		if u.Scheme == "http" && !isLoopback(u.Hostname()) {
			return fmt.Errorf("--etcd-endpoints: %q is plain HTTP to a host that is not loopback: use https:// with --etcd-ca (and --etcd-cert/--etcd-key)", ep)
		}
	}
	if (e.Cert == "") != (e.Key == "") {
		return errors.New("--etcd-cert and --etcd-key go together")
	}
	if !strings.HasPrefix(e.Prefix, "/") {
		return fmt.Errorf("--etcd-prefix %q must start with /", e.Prefix)
	}
	_, err := clientTLS(e)
	return err
}

func isLoopback(host string) bool {
	if host == "localhost" {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}

// clientTLS is the client TLS configuration, nil for plain loopback.
func clientTLS(e store.Etcd) (*tls.Config, error) {
	if e.CA == "" && e.Cert == "" {
		return nil, nil
	}
	cfg := &tls.Config{MinVersion: tls.VersionTLS12}
	if e.CA != "" {
		pool, err := tlsutil.LoadPool(e.CA)
		if err != nil {
			return nil, fmt.Errorf("--etcd-ca: %w", err)
		}
		cfg.RootCAs = pool
	}
	if e.Cert != "" {
		cert, err := tls.LoadX509KeyPair(e.Cert, e.Key)
		if err != nil {
			return nil, fmt.Errorf("--etcd-cert/--etcd-key: %w", err)
		}
		cfg.Certificates = []tls.Certificate{cert}
	}
	return cfg, nil
}

func (driver) Connect(cfg store.Config) (store.Conn, error) {
	tcfg, err := clientTLS(cfg.Etcd)
	if err != nil {
		return nil, err
	}
	cli, err := clientv3.New(ClientConfig(cfg.Etcd.Endpoints, tcfg))
	if err != nil {
		return nil, fmt.Errorf("etcd: %w", err)
	}
	return &conn{cfg: cfg, cli: cli}, nil
}

// conn is a client of the cluster; the store is opened on it.
type conn struct {
	cfg store.Config
	cli *clientv3.Client
}

// explain says what to check when etcd does not answer.
func (c *conn) explain(err error) error {
	eps := strings.Join(c.cfg.Etcd.Endpoints, ",")
	if errors.Is(err, context.DeadlineExceeded) {
		hint := "is etcd running there?"
		if strings.Contains(eps, "https://") {
			hint = "is etcd running there, does --etcd-ca verify its certificate, and do --etcd-cert/--etcd-key hold a client certificate it accepts?"
		}
		return fmt.Errorf("etcd did not answer at %s: %w (%s)", eps, err, hint)
	}
	return fmt.Errorf("%w (endpoints %s)", err, eps)
}

func (c *conn) Peek(key string) ([]byte, bool, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	v, empty, err := Peek(ctx, c.cli, c.cfg.Etcd.Prefix, key)
	if err != nil {
		return nil, false, c.explain(err)
	}
	p := c.cfg.Etcd.Prefix
	if !strings.HasSuffix(p, "/") {
		p += "/"
	}
	if r, err := c.cli.Get(ctx, restoringK(p), clientv3.WithCountOnly()); err != nil {
		return nil, false, c.explain(err)
	} else if r.Count > 0 {
		return nil, false, ErrRestoreUnfinished
	}
	return v, empty, nil
}

func (c *conn) Open(sealer kms.Sealer) (store.Backend, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	log := c.cfg.Logger
	s, err := Open(ctx, c.cli, Options{Prefix: c.cfg.Etcd.Prefix, Logger: log, Sealer: sealer, UpgradeUntagged: c.cfg.UpgradeUntagged})
	if err != nil {
		return nil, c.explain(err)
	}
	if log != nil {
		if n := s.Upgraded(); n > 0 {
			log.Warn("store: gave their tags to the records an older kmsd wrote (must happen once per prefix: README, Storage trust)", "records", n)
		}
		log.Info("store: etcd", "endpoints", strings.Join(c.cfg.Etcd.Endpoints, ","), "prefix", c.cfg.Etcd.Prefix, "cache_bound", Bound().String())
	}
	return s, nil
}

func (c *conn) Close() error { return c.cli.Close() }

// Shared is true: replicas share the cluster.
func (s *Store) Shared() bool { return true }

// Stats are the audit log's group commits and conflicts.
func (s *Store) Stats() []any {
	return []any{"audit_group_commits", s.audit.Groups(), "audit_conflicts", s.audit.Conflicts()}
}

var _ store.Backend = (*Store)(nil)
