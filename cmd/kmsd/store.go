package main

import (
	"fmt"
	"log/slog"
	"strings"

	"github.com/kmsd-project/kmsd/store"
	// The stores kmsd offers (--store), each registering itself.
	_ "github.com/kmsd-project/kmsd/store/bolt"
	_ "github.com/kmsd-project/kmsd/store/etcd"
)

// storeConfig is the store's part of kmsd's settings.
func storeConfig(c config, log *slog.Logger) store.Config {
	sc := store.Config{
		DataDir:         c.dataDir,
		AuditWALSize:    c.auditWALMiB << 20,
		UpgradeUntagged: c.upgradeStore,
		Etcd:            store.Etcd{Prefix: c.etcdPrefix, CA: c.etcdCA, Cert: c.etcdCert, Key: c.etcdKey},
		Logger:          log,
	}
	if c.etcdEndpoints != "" {
		sc.Etcd.Endpoints = strings.Split(c.etcdEndpoints, ",")
	}
	return sc
}

// checkStore checks the store settings before anything touches the disk.
func checkStore(c config) error {
	d, err := store.Lookup(c.store)
	if err != nil {
		return fmt.Errorf("--store %q: want %s", c.store, strings.Join(store.Names(), " or "))
	}
	return d.Check(storeConfig(c, nil))
}

// connectStore reaches the configured store (etcd) or finds its file.
func connectStore(c config, log *slog.Logger) (store.Conn, error) {
	d, err := store.Lookup(c.store)
	if err != nil {
		return nil, err
	}
	return d.Connect(storeConfig(c, log))
}
