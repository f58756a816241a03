package etcd_test

import (
	"context"
	b64 "encoding/base64"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/kmsd-project/kmsd/internal/testetcd"
	"github.com/kmsd-project/kmsd/internal/testhsm"
	"github.com/kmsd-project/kmsd/kms"
	"github.com/kmsd-project/kmsd/store/etcd"
)

func rawGet(t *testing.T, cli *clientv3.Client, key string) []byte {
	t.Helper()
	r, err := cli.Get(context.Background(), key)
	if err != nil || len(r.Kvs) != 1 {
		t.Fatalf("get %s: %v %v", key, r, err)
	}
	return r.Kvs[0].Value
}

func rawPut(t *testing.T, cli *clientv3.Client, key string, v []byte) {
	t.Helper()
	if _, err := cli.Put(context.Background(), key, string(v)); err != nil {
		t.Fatal(err)
	}
}

func isTamper(err error, path string) bool {
	var te *kms.TamperError
	return errors.As(err, &te) && strings.HasPrefix(te.Path, path) && errors.Is(err, kms.ErrInternal)
}

// TestEtcdWriterIsNotAdmin is the review's reproduction on a real etcd:
// whoever can write to etcd forges a token record, edits a version's
// state, moves a record, puts an earlier authentic record back, or deletes
// a pending audit group. A forged, edited or moved record is refused when
// read, naming it; a record put back or deleted is found by the next
// scrub, after which every record is refused (never acted on).
func TestEtcdWriterIsNotAdmin(t *testing.T) {
	ctx := context.Background()
	cli := client(t)
	setup := func(t *testing.T) (*etcd.Store, string) {
		p := newPrefix(t)
		s := open(t, p)
		if err := s.CreateKey(ctx, &kms.Key{Name: "k", Primary: 1, Latest: 1}, &kms.Version{Number: 1, State: kms.StateEnabled, Sealed: []byte("x")}, nil); err != nil {
			t.Fatal(err)
		}
		if err := s.CreateToken(ctx, &kms.Token{ID: "admin1", Role: "admin", Hash: []byte("h")}, nil); err != nil {
			t.Fatal(err)
		}
		return s, p
	}
	disable := func(t *testing.T, s *etcd.Store) {
		err := s.UpdateKey(ctx, "k", func(tx kms.KeyTx) ([]*kms.AuditRecord, error) {
			v, err := tx.Version(1)
			if err == nil {
				v.State = kms.StateDisabled
			}
			return nil, err
		})
		if err != nil {
			t.Fatal(err)
		}
	}

	t.Run("forged token", func(t *testing.T) {
		s, p := setup(t)
		rawPut(t, cli, p+"t/forged", []byte(`{"id":"forged","role":"admin","keys":["*"],"hash":"AAAA"}`))
		if _, err := s.GetToken(ctx, "forged"); !isTamper(err, "t/forged") {
			t.Fatalf("forged token read: %v", err)
		}
		if _, err := s.ListTokens(ctx, "", 10); !isTamper(err, "t/forged") {
			t.Fatalf("list with a forged token: %v", err)
		}
		if _, err := s.GetToken(ctx, "admin1"); err != nil {
			t.Fatalf("an untouched token: %v", err)
		}
		if _, err := s.Scrub(ctx); !isTamper(err, "t/forged") {
			t.Fatalf("scrub: %v", err)
		}
	})
	t.Run("version state edited", func(t *testing.T) {
		s, p := setup(t)
		disable(t, s)
		k := p + "v/k/0000000000000001"
		v := rawGet(t, cli, k)
		rawPut(t, cli, k, []byte(strings.Replace(string(v), `"disabled"`, `"enabled" `, 1)))
		if _, err := s.GetVersion(ctx, "k", 1); !isTamper(err, "v/k/") {
			t.Fatalf("edited version read: %v", err)
		}
		err := s.UpdateKey(ctx, "k", func(tx kms.KeyTx) ([]*kms.AuditRecord, error) { _, err := tx.Version(1); return nil, err })
		if !isTamper(err, "v/k/") {
			t.Fatalf("update over an edited version: %v", err)
		}
	})
	t.Run("record moved", func(t *testing.T) {
		s, p := setup(t)
		rawPut(t, cli, p+"t/admin2", rawGet(t, cli, p+"t/admin1"))
		if _, err := s.GetToken(ctx, "admin2"); !isTamper(err, "t/admin2") {
			t.Fatalf("moved token read: %v", err)
		}
	})
	t.Run("earlier version record put back", func(t *testing.T) {
		s, p := setup(t)
		k := p + "v/k/0000000000000001"
		enabled := rawGet(t, cli, k)
		disable(t, s)
		if _, err := s.Scrub(ctx); err != nil {
			t.Fatalf("scrub before: %v", err)
		}
		rawPut(t, cli, k, enabled)
		if _, err := s.Scrub(ctx); !isTamper(err, "") {
			t.Fatalf("scrub after the put-back: %v", err)
		}
		if _, err := s.GetVersion(ctx, "k", 1); !isTamper(err, "") {
			t.Fatalf("the version put back is served: %v", err)
		}
		if err := s.Ping(ctx); !isTamper(err, "") {
			t.Fatalf("ping of a broken store: %v", err)
		}
		if in := s.Integrity(); in.Broken == nil || in.LastError == "" {
			t.Fatalf("integrity: %+v", in)
		}
		// A new process on the store refuses it at start.
		if _, err := etcd.Open(ctx, cli, etcd.Options{Prefix: p, Sealer: sealer(t)}); !isTamper(err, "") {
			t.Fatalf("open of a rolled-back prefix: %v", err)
		}
	})
	t.Run("token revocation undone", func(t *testing.T) {
		s, p := setup(t)
		active := rawGet(t, cli, p+"t/admin1")
		if err := s.UpdateToken(ctx, "admin1", func(tk *kms.Token) ([]*kms.AuditRecord, error) {
			now := time.Now()
			tk.RevokedAt = &now
			return nil, nil
		}); err != nil {
			t.Fatal(err)
		}
		rawPut(t, cli, p+"t/admin1", active)
		if _, err := s.Scrub(ctx); !isTamper(err, "") {
			t.Fatalf("scrub after un-revoking: %v", err)
		}
		if _, err := s.GetToken(ctx, "admin1"); !isTamper(err, "") {
			t.Fatalf("the un-revoked token is served: %v", err)
		}
	})
	t.Run("pending audit group deleted", func(t *testing.T) {
		s, p := setup(t)
		s.StopSealing()
		if err := s.WriteAudit(ctx, []*kms.AuditRecord{rec("acknowledged")}); err != nil {
			t.Fatal(err)
		}
		r, err := cli.Get(ctx, p+"a/q/", clientv3.WithPrefix())
		if err != nil || len(r.Kvs) == 0 {
			t.Fatalf("no pending group: %v", err)
		}
		if _, err := cli.Delete(ctx, string(r.Kvs[0].Key)); err != nil {
			t.Fatal(err)
		}
		if _, err := s.Scrub(ctx); !isTamper(err, "") {
			t.Fatalf("scrub after a pending group was deleted: %v", err)
		}
	})
	t.Run("record key deleted", func(t *testing.T) {
		_, p := setup(t)
		if _, err := cli.Delete(ctx, p+"m/record-key"); err != nil {
			t.Fatal(err)
		}
		// Records with tags and no key: they do not pass as records of an
		// older kmsd to tag again.
		_, err := etcd.Open(ctx, cli, etcd.Options{Prefix: p, Sealer: sealer(t)})
		if err == nil {
			t.Fatal("opened a prefix whose record key was deleted")
		}
	})
}

// TestScrubAcrossReplicas: three replicas write one prefix at once (each
// moving its own shard of the digest) while each scrubs: every scrub
// passes, and the sum of the shards is the records'.
func TestScrubAcrossReplicas(t *testing.T) {
	p := newPrefix(t)
	rs := []*etcd.Store{open(t, p), open(t, p), open(t, p)}
	ctx := context.Background()
	if err := rs[0].CreateKey(ctx, &kms.Key{Name: "k", Primary: 1, Latest: 1}, &kms.Version{Number: 1, State: kms.StateEnabled, Sealed: []byte("x")}, nil); err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	errs := make(chan error, 100)
	for i, s := range rs {
		wg.Go(func() {
			for j := range 10 {
				if _, err := rotate(s, "k", "rotate"); err != nil {
					errs <- err
					return
				}
				if err := s.CreateToken(ctx, &kms.Token{ID: string(rune('a'+i)) + string(rune('a'+j)), Role: "reader", Hash: []byte("h")}, []*kms.AuditRecord{rec("token")}); err != nil {
					errs <- err
					return
				}
				if _, err := s.Scrub(ctx); err != nil {
					errs <- err
					return
				}
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	for _, s := range rs {
		rep, err := s.Scrub(ctx)
		if err != nil || rep.Records < 1+31+30 {
			t.Fatalf("final scrub: %+v %v", rep, err)
		}
	}
}

func sealer(t *testing.T) kms.Sealer { return testhsm.Open(t) }

// TestDestroyCompactsHistory: a destroy compacts etcd's history up to its
// revision, so the version's sealed material cannot be read at an earlier
// revision.
func TestDestroyCompactsHistory(t *testing.T) {
	ctx := context.Background()
	p := newPrefix(t)
	s := open(t, p)
	cli := client(t)
	if err := s.CreateKey(ctx, &kms.Key{Name: "k", Primary: 1, Latest: 1}, &kms.Version{Number: 1, State: kms.StateEnabled, Sealed: []byte("sealed material")}, nil); err != nil {
		t.Fatal(err)
	}
	if _, err := rotate(s, "k", "rotate"); err != nil {
		t.Fatal(err)
	}
	before, err := cli.Get(ctx, p+"v/k/0000000000000001")
	if err != nil || !strings.Contains(string(before.Kvs[0].Value), base64("sealed material")) {
		t.Fatalf("version 1 before: %v", err)
	}
	err = s.UpdateKey(ctx, "k", func(tx kms.KeyTx) ([]*kms.AuditRecord, error) {
		v, err := tx.Version(1)
		if err == nil {
			v.State, v.Sealed = kms.StateDestroyed, nil
		}
		return nil, err
	})
	if err != nil {
		t.Fatal(err)
	}
	if s.Compactions() != 1 {
		t.Fatalf("%d compactions after a destroy", s.Compactions())
	}
	_, err = cli.Get(ctx, p+"v/k/0000000000000001", clientv3.WithRev(before.Header.Revision))
	if err == nil || !strings.Contains(err.Error(), "compacted") {
		t.Fatalf("read of the destroyed material's revision: %v", err)
	}
	// The store still works, and passes its scrub.
	if _, err := rotate(s, "k", "rotate"); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Scrub(ctx); err != nil {
		t.Fatal(err)
	}
	if _, vs, err := s.ListVersions(ctx, "k", 0, 10); err != nil || len(vs) != 3 {
		t.Fatalf("versions: %v %v", vs, err)
	}
}

func base64(s string) string { return b64.StdEncoding.EncodeToString([]byte(s)) }

// TestWatchCatchesPutBack: a record put back while replicas run is caught
// by every replica's watch as it happens (its write count goes back), not
// at the next scrub; so is a record deleted.
func TestWatchCatchesPutBack(t *testing.T) {
	ctx := context.Background()
	cli := client(t)
	for _, c := range []struct {
		name string
		edit func(p string, active []byte)
	}{
		{"revocation undone", func(p string, active []byte) { rawPut(t, cli, p+"t/admin1", active) }},
		{"token deleted", func(p string, _ []byte) { cli.Delete(ctx, p+"t/admin1") }},
	} {
		t.Run(c.name, func(t *testing.T) {
			p := newPrefix(t)
			a, b := open(t, p), open(t, p)
			if err := a.CreateToken(ctx, &kms.Token{ID: "admin1", Role: "admin", Hash: []byte("h")}, nil); err != nil {
				t.Fatal(err)
			}
			active := rawGet(t, cli, p+"t/admin1")
			if err := a.UpdateToken(ctx, "admin1", func(tk *kms.Token) ([]*kms.AuditRecord, error) {
				now := time.Now()
				tk.RevokedAt = &now
				return nil, nil
			}); err != nil {
				t.Fatal(err)
			}
			c.edit(p, active)
			deadline := time.Now().Add(etcd.Bound())
			for _, s := range []*etcd.Store{a, b} {
				for s.Ping(ctx) == nil && time.Now().Before(deadline) {
					time.Sleep(5 * time.Millisecond)
				}
				if err := s.Ping(ctx); !isTamper(err, "t/admin1") {
					t.Fatalf("a replica after the edit: %v", err)
				}
				if _, err := s.GetToken(ctx, "admin1"); !isTamper(err, "t/admin1") {
					t.Fatalf("the token is served: %v", err)
				}
			}
		})
	}
}

// TestUpgradeMarkerCannotBless is the outside review's attack: an untagged
// admin token and an upgrade marker written into etcd were tagged by the
// next start, and the forged token accepted. Now a prefix with a record
// key tags nothing unless the marker came with the key, and only records
// older than the key; and without --upgrade-untagged-store nothing at all.
func TestUpgradeMarkerCannotBless(t *testing.T) {
	ctx := context.Background()
	cli := client(t)
	p := newPrefix(t)
	s := open(t, p)
	if err := s.CreateToken(ctx, &kms.Token{ID: "admin1", Role: "admin", Hash: []byte("h")}, nil); err != nil {
		t.Fatal(err)
	}
	rawPut(t, cli, p+"t/evil", []byte(`{"id":"evil","role":"admin","keys":["*"],"hash":"AAAA"}`))
	rawPut(t, cli, p+"m/upgrade", []byte("x"))
	for _, upgrade := range []bool{false, true} {
		if _, err := etcd.Open(ctx, cli, etcd.Options{Prefix: p, Sealer: sealer(t), UpgradeUntagged: upgrade}); err == nil {
			t.Fatalf("open with a marker written after the key (upgrade %v) succeeded", upgrade)
		}
	}
	if _, err := s.GetToken(ctx, "evil"); !isTamper(err, "") {
		t.Fatalf("the forged token: %v", err)
	}
	if _, err := s.Scrub(ctx); !isTamper(err, "") {
		t.Fatalf("scrub with the marker: %v", err)
	}
}

// TestUntaggedPrefixNeedsTheFlag: a prefix an older kmsd wrote (records,
// no record key) is refused without --upgrade-untagged-store and tagged
// with it; its records then read back and the scrub passes.
func TestUntaggedPrefixNeedsTheFlag(t *testing.T) {
	ctx := context.Background()
	cli := client(t)
	p := newPrefix(t)
	rawPut(t, cli, p+"t/old1", []byte(`{"id":"old1","role":"admin","keys":["*"],"hash":"aA=="}`))
	rawPut(t, cli, p+"k/k", []byte(`{"name":"k","kind":"ml-dsa-65","primary":1,"latest":1}`))
	rawPut(t, cli, p+"v/k/0000000000000001", []byte(`{"number":1,"state":"enabled","sealed":"eA=="}`))
	if _, err := etcd.Open(ctx, cli, etcd.Options{Prefix: p, Sealer: sealer(t)}); !errors.Is(err, etcd.ErrUntagged) {
		t.Fatalf("open of an untagged prefix without the flag: %v", err)
	}
	s, err := etcd.Open(ctx, cli, etcd.Options{Prefix: p, Sealer: sealer(t), UpgradeUntagged: true})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if s.Upgraded() != 3 {
		t.Fatalf("%d records tagged", s.Upgraded())
	}
	if tk, err := s.GetToken(ctx, "old1"); err != nil || tk.Role != "admin" {
		t.Fatalf("token after the upgrade: %+v %v", tk, err)
	}
	if v, err := s.GetVersion(ctx, "k", 1); err != nil || string(v.Sealed) != "x" {
		t.Fatalf("version after the upgrade: %+v %v", v, err)
	}
	if _, err := s.Scrub(ctx); err != nil {
		t.Fatal(err)
	}
}

// TestElectionSquatFound: an election key without a lease (a role held
// outside kmsd, so that nothing is ever destroyed or checkpointed) fails
// the scrub.
func TestElectionSquatFound(t *testing.T) {
	ctx := context.Background()
	p := newPrefix(t)
	s := open(t, p)
	rawPut(t, client(t), p+"lead/destruction/0", []byte("squatter"))
	if _, err := s.Scrub(ctx); !isTamper(err, "lead/") {
		t.Fatalf("scrub with a squatted election: %v", err)
	}
}

// TestQuotaCrossingWriteIsKnown: etcd applies the write that crosses its
// space quota and then answers "database space exceeded". The store reads
// back its digest shard, which every commit writes, and reports that write
// as done: a create refused while etcd is full does not exist afterwards,
// and every create reported done does.
func TestQuotaCrossingWriteIsKnown(t *testing.T) {
	c := testetcd.StartWith(t, 1, "--quota-backend-bytes", strconv.Itoa(1<<20))
	cli, err := clientv3.New(etcd.ClientConfig(c.Endpoints(), nil))
	if err != nil {
		t.Fatal(err)
	}
	defer cli.Close()
	ctx := context.Background()
	s, err := etcd.Open(ctx, cli, etcd.Options{Prefix: "/quota/", Sealer: sealer(t)})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	// Writers at once, as kmsd's requests and audit groups are: a write
	// that passed etcd's quota check can be applied after another crossed
	// the quota, and then answered with the quota error.
	var mu sync.Mutex
	var done, refusedAll []string
	var wg sync.WaitGroup
	for g := range 2 {
		// Another writer of the cluster (elections, checkpoints, another
		// prefix), whose writes race the store's.
		wg.Go(func() {
			for i := 0; i < 100000; i++ {
				if _, err := cli.Put(ctx, fmt.Sprintf("/other/%d/%d", g, i), string(make([]byte, 3000))); err != nil {
					return
				}
			}
		})
	}
	for g := range 4 {
		wg.Go(func() {
			for i := 0; i < 10000; i++ {
				name := fmt.Sprintf("g%d-k%05d", g, i)
				err := s.CreateKey(ctx, &kms.Key{Name: name, Primary: 1, Latest: 1}, &kms.Version{Number: 1, State: kms.StateEnabled, Sealed: make([]byte, 4000)}, nil)
				mu.Lock()
				if err != nil {
					refusedAll = append(refusedAll, name)
				} else {
					done = append(done, name)
				}
				mu.Unlock()
				if err != nil {
					return
				}
			}
		})
	}
	wg.Wait()
	if len(refusedAll) == 0 {
		t.Fatal("etcd never filled up")
	}
	c.Kill(0)
	c.SetFlag("--quota-backend-bytes", strconv.Itoa(64<<20))
	c.Restart(0)
	c.WaitHealthy()
	if _, err := cli.AlarmDisarm(ctx, &clientv3.AlarmMember{}); err != nil {
		t.Fatal(err)
	}
	for _, name := range refusedAll {
		if _, err := s.GetKey(ctx, name); !errors.Is(err, kms.ErrNotFound) {
			t.Fatalf("%s, refused while etcd was full: %v, want not found", name, err)
		}
	}
	for _, name := range done {
		if _, err := s.GetKey(ctx, name); err != nil {
			t.Fatalf("%s, reported created: %v", name, err)
		}
	}
	if _, err := s.Scrub(ctx); err != nil {
		t.Fatal(err)
	}
}
