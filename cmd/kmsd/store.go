package main

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/url"
	"path/filepath"
	"strings"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/kmsd-project/kmsd/audit/engine"
	"github.com/kmsd-project/kmsd/internal/tlsutil"
	"github.com/kmsd-project/kmsd/kms"
	"github.com/kmsd-project/kmsd/kms/bolt"
	"github.com/kmsd-project/kmsd/kms/etcd"
)

// backend is what kmsd needs of a store beyond kms.Store.
type backend interface {
	kms.Store
	Audit() *engine.Log
	Meta(key string) ([]byte, error)
	PutMeta(key string, value []byte) error
	ClaimMeta(key string, value []byte) ([]byte, error)
	Empty() (bool, error)
}

// checkStore checks the store settings before anything touches the disk.
func checkStore(c config) error {
	switch c.store {
	case "bolt":
		if c.etcdEndpoints != "" {
			return errors.New("--etcd-endpoints is for --store etcd")
		}
		return nil
	case "etcd":
	default:
		return fmt.Errorf("--store %q: want bolt (the embedded default) or etcd", c.store)
	}
	if c.etcdEndpoints == "" {
		return errors.New("--store etcd needs --etcd-endpoints (comma-separated URLs of the cluster's members, e.g. https://10.0.0.1:2379)")
	}
	for i, e := range strings.Split(c.etcdEndpoints, ",") {
		u, err := url.Parse(e)
		if err == nil && u.User != nil {
			// Not echoed: the URL holds a password, which must not reach
			// a log or an error message.
			return fmt.Errorf("--etcd-endpoints: endpoint %d carries credentials; kmsd authenticates to etcd with --etcd-cert/--etcd-key only", i+1)
		}
		if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" || (u.Path != "" && u.Path != "/") || u.RawQuery != "" || u.Fragment != "" {
			return fmt.Errorf("--etcd-endpoints: %q is not an http:// or https:// URL of a member", e)
		}
		if u.Scheme == "http" && !isLoopback(u.Hostname()) {
			return fmt.Errorf("--etcd-endpoints: %q is plain HTTP to a host that is not loopback: use https:// with --etcd-ca (and --etcd-cert/--etcd-key)", e)
		}
	}
	if (c.etcdCert == "") != (c.etcdKey == "") {
		return errors.New("--etcd-cert and --etcd-key go together")
	}
	if !strings.HasPrefix(c.etcdPrefix, "/") {
		return fmt.Errorf("--etcd-prefix %q must start with /", c.etcdPrefix)
	}
	if _, err := etcdTLS(c); err != nil {
		return err
	}
	return nil
}

func isLoopback(host string) bool {
	if host == "localhost" {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}

// etcdTLS is the client TLS configuration, nil for plain loopback.
func etcdTLS(c config) (*tls.Config, error) {
	if c.etcdCA == "" && c.etcdCert == "" {
		return nil, nil
	}
	cfg := &tls.Config{MinVersion: tls.VersionTLS12}
	if c.etcdCA != "" {
		pool, err := tlsutil.LoadPool(c.etcdCA)
		if err != nil {
			return nil, fmt.Errorf("--etcd-ca: %w", err)
		}
		cfg.RootCAs = pool
	}
	if c.etcdCert != "" {
		cert, err := tls.LoadX509KeyPair(c.etcdCert, c.etcdKey)
		if err != nil {
			return nil, fmt.Errorf("--etcd-cert/--etcd-key: %w", err)
		}
		cfg.Certificates = []tls.Certificate{cert}
	}
	return cfg, nil
}

// openStore opens the configured store; close closes it (and its client).
func openStore(c config, log *slog.Logger) (s backend, close func() error, err error) {
	if c.store == "bolt" {
		b, err := bolt.Open(filepath.Join(c.dataDir, "kms.db"), bolt.Options{AuditWALSize: c.auditWALMiB << 20})
		if err != nil {
			return nil, nil, err
		}
		if from, to, keys, versions := b.Migrated(); from != "" {
			log.Info("kms.db migrated: each key version is now a record of its own", "from_schema", from, "to_schema", to, "keys", keys, "versions", versions)
		}
		if b.Audit().JournalMissing() {
			log.Error("audit WAL: the file kms.db-audit-wal was missing at start beside a database with records: records acknowledged after the last flush before the previous stop, if any, are lost; a new WAL was made")
		}
		if n := b.Audit().JournalRecovered(); n > 0 {
			log.Info("audit WAL: copied records acknowledged before a crash into kms.db", "records", n)
		}
		return b, b.Close, nil
	}
	tcfg, err := etcdTLS(c)
	if err != nil {
		return nil, nil, err
	}
	cli, err := clientv3.New(etcd.ClientConfig(strings.Split(c.etcdEndpoints, ","), tcfg))
	if err != nil {
		return nil, nil, fmt.Errorf("etcd: %w", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	e, err := etcd.Open(ctx, cli, etcd.Options{Prefix: c.etcdPrefix, Logger: log})
	if err != nil {
		cli.Close()
		if errors.Is(err, context.DeadlineExceeded) {
			hint := "is etcd running there?"
			if strings.Contains(c.etcdEndpoints, "https://") {
				hint = "is etcd running there, does --etcd-ca verify its certificate, and do --etcd-cert/--etcd-key hold a client certificate it accepts?"
			}
			return nil, nil, fmt.Errorf("etcd did not answer at %s: %w (%s)", c.etcdEndpoints, err, hint)
		}
		return nil, nil, fmt.Errorf("%w (endpoints %s)", err, c.etcdEndpoints)
	}
	log.Info("store: etcd", "endpoints", c.etcdEndpoints, "prefix", c.etcdPrefix, "cache_bound", etcd.Bound().String())
	return e, func() error {
		err := e.Close()
		if cerr := cli.Close(); err == nil {
			err = cerr
		}
		return err
	}, nil
}

// leader is how background work elects its replica: nil (always) for the
// embedded store, an etcd election for the replicated one.
func leader(s backend) func(context.Context, string, func(context.Context)) {
	if e, ok := s.(*etcd.Store); ok {
		return e.Lead
	}
	return nil
}
