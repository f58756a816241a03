package bolt_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"path/filepath"
	"strings"
	"testing"
	"time"

	bbolt "go.etcd.io/bbolt"

	"github.com/kmsd-project/kmsd/internal/testhsm"
	"github.com/kmsd-project/kmsd/kms"
	"github.com/kmsd-project/kmsd/store/bolt"
)

// writeV1 makes a file as schema 1 laid it out: each key one record with
// its versions inside. records maps a key name to its record's JSON.
func writeV1(t *testing.T, path string, records map[string]string, extra func(tx *bbolt.Tx) error) {
	t.Helper()
	db, err := bbolt.Open(path, 0o600, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	err = db.Update(func(tx *bbolt.Tx) error {
		for _, b := range []string{"keys", "tokens", "meta", "audit_records", "audit_checkpoints", "blob_owners"} {
			if _, err := tx.CreateBucket([]byte(b)); err != nil {
				return err
			}
		}
		if err := tx.Bucket([]byte("meta")).Put([]byte("schema"), []byte("1")); err != nil {
			return err
		}
		for name, rec := range records {
			if err := tx.Bucket([]byte("keys")).Put([]byte(name), []byte(rec)); err != nil {
				return err
			}
		}
		if extra != nil {
			return extra(tx)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}

// v1Record is a schema-1 key record with n versions; version 2 (if any)
// is scheduled for destruction.
func v1Record(name string, n int) string {
	type version struct {
		Number    uint64     `json:"number"`
		State     string     `json:"state"`
		CreatedAt time.Time  `json:"created_at"`
		DestroyAt *time.Time `json:"destroy_at,omitempty"`
		PublicKey []byte     `json:"public_key"`
		Sealed    []byte     `json:"sealed"`
	}
	at := time.Date(2026, 2, 1, 0, 0, 0, 0, time.UTC)
	vs := make([]version, n)
	for i := range vs {
		vs[i] = version{Number: uint64(i + 1), State: "enabled", CreatedAt: at, PublicKey: []byte(fmt.Sprintf("%s-pub%d", name, i+1)), Sealed: []byte(fmt.Sprintf("%s-sealed%d", name, i+1))}
	}
	if n >= 2 {
		d := at.AddDate(0, 0, 30)
		vs[1].State, vs[1].DestroyAt = "destroy_scheduled", &d
	}
	b, _ := json.Marshal(map[string]any{"name": name, "kind": "ml-dsa-65", "policy": map[string]any{"destroy_wait_days": 30},
		"created_at": at, "primary": n, "min_decryption_version": 1, "versions": vs})
	return string(b)
}

func TestMigratesSchema1(t *testing.T) {
	path := filepath.Join(t.TempDir(), "kms.db")
	writeV1(t, path, map[string]string{"a": v1Record("a", 3), "_identity": v1Record("_identity", 1), "b": v1Record("b", 40)}, nil)
	if _, err := bolt.Open(path, bolt.Options{Sealer: testhsm.Open(t)}); !errors.Is(err, bolt.ErrUntagged) {
		t.Fatalf("open of a schema-1 file without --upgrade-untagged-store: %v", err)
	}
	s, err := bolt.Open(path, bolt.Options{Sealer: testhsm.Open(t), UpgradeUntagged: true})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if m := s.Migration(); m.From != "1" || m.To != "3" || m.Keys != 3 || m.Versions != 44 {
		t.Fatalf("Migration() = %+v", m)
	}
	ctx := context.Background()
	for name, n := range map[string]uint64{"a": 3, "b": 40, "_identity": 1} {
		k, err := s.GetKey(ctx, name)
		if err != nil || k.Latest != n || k.Primary != n || k.Kind != "ml-dsa-65" || k.Policy.DestroyWaitDays != 30 {
			t.Fatalf("key %s after migration: %+v %v", name, k, err)
		}
		for i := uint64(1); i <= n; i++ {
			v, err := s.GetVersion(ctx, name, i)
			if err != nil || string(v.PublicKey) != fmt.Sprintf("%s-pub%d", name, i) || string(v.Sealed) != fmt.Sprintf("%s-sealed%d", name, i) {
				t.Fatalf("%s version %d after migration: %+v %v", name, i, v, err)
			}
		}
	}
	// The destroy schedule was indexed on the way.
	due, err := s.DueVersions(ctx, time.Date(2027, 1, 1, 0, 0, 0, 0, time.UTC), 10)
	if err != nil || len(due) != 2 || due[0].Version != 2 || due[1].Version != 2 {
		t.Fatalf("DueVersions after migration: %v %v", due, err)
	}
	if err := s.Check(); err != nil {
		t.Fatal(err)
	}
	s.Close()
	// A second open finds schema 3 and migrates nothing.
	s2, err := bolt.Open(path, bolt.Options{Sealer: testhsm.Open(t)})
	if err != nil {
		t.Fatal(err)
	}
	defer s2.Close()
	if m := s2.Migration(); m.From != "" {
		t.Fatalf("migrated again from %q", m.From)
	}
}

// TestRefusesHalfMigratedFile: a schema-1 file that already holds version
// records, or a schema-1 record that does not hold together, stops Open
// and leaves the file as it was.
func TestRefusesHalfMigratedFile(t *testing.T) {
	broken := map[string]string{
		"gap":          strings.Replace(v1Record("a", 3), `"number":2`, `"number":5`, 1),
		"primary":      strings.Replace(v1Record("a", 3), `"primary":3`, `"primary":4`, 1),
		"no versions":  `{"name":"a","kind":"ml-dsa-65","primary":1,"versions":[]}`,
		"other name":   strings.Replace(v1Record("a", 1), `"name":"a"`, `"name":"b"`, 1),
		"not json":     `{"name":`,
		"has a latest": strings.Replace(v1Record("a", 1), `"primary":1`, `"primary":1,"latest":1`, 1),
	}
	for name, rec := range broken {
		t.Run(name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "kms.db")
			writeV1(t, path, map[string]string{"a": rec, "z": v1Record("z", 2)}, nil)
			if s, err := bolt.Open(path, bolt.Options{Sealer: testhsm.Open(t)}); err == nil {
				s.Close()
				t.Fatal("opened")
			}
			assertSchema1(t, path)
		})
	}
	t.Run("version records present", func(t *testing.T) {
		path := filepath.Join(t.TempDir(), "kms.db")
		writeV1(t, path, map[string]string{"a": v1Record("a", 2), "z": v1Record("z", 2)}, func(tx *bbolt.Tx) error {
			b, err := tx.CreateBucket([]byte("versions"))
			if err != nil {
				return err
			}
			return b.Put([]byte("a\x00\x00\x00\x00\x00\x00\x00\x00\x01"), []byte(`{"number":1}`))
		})
		_, err := bolt.Open(path, bolt.Options{Sealer: testhsm.Open(t)})
		if err == nil || !strings.Contains(err.Error(), "half-migrated") {
			t.Fatalf("Open: %v", err)
		}
		assertSchema1(t, path)
	})
}

// assertSchema1 checks that a refused migration changed nothing.
func assertSchema1(t *testing.T, path string) {
	t.Helper()
	db, err := bbolt.Open(path, 0o600, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	db.View(func(tx *bbolt.Tx) error {
		if s := string(tx.Bucket([]byte("meta")).Get([]byte("schema"))); s != "1" {
			t.Fatalf("schema %q after a refused migration", s)
		}
		if b := tx.Bucket([]byte("destroy_due")); b != nil {
			t.Fatal("a refused migration made buckets")
		}
		var rec struct {
			Versions []kms.Version `json:"versions"`
		}
		if err := json.Unmarshal(tx.Bucket([]byte("keys")).Get([]byte("z")), &rec); err != nil || len(rec.Versions) != 2 {
			t.Fatalf("key z after a refused migration: %v %v", rec, err)
		}
		return nil
	})
}

func TestRefusesNewerSchema(t *testing.T) {
	path := filepath.Join(t.TempDir(), "kms.db")
	writeV1(t, path, nil, func(tx *bbolt.Tx) error { return tx.Bucket([]byte("meta")).Put([]byte("schema"), []byte("4")) })
	if _, err := bolt.Open(path, bolt.Options{Sealer: testhsm.Open(t)}); err == nil || !strings.Contains(err.Error(), `"4"`) {
		t.Fatalf("Open of a schema-4 file: %v", err)
	}
}

// TestTagsSchema2: a schema-2 file (records without tags) gets a record
// key and every record its tag, in the one transaction of the first open;
// the records read back as they were, and the digest sums.
func TestTagsSchema2(t *testing.T) {
	path := filepath.Join(t.TempDir(), "kms.db")
	writeV1(t, path, nil, func(tx *bbolt.Tx) error {
		for _, b := range []string{"versions", "destroy_due"} {
			if _, err := tx.CreateBucket([]byte(b)); err != nil {
				return err
			}
		}
		puts := []struct{ b, k, v string }{
			{"meta", "schema", "2"},
			{"meta", "x-sealed-under", `{"token":"kmsd"}`},
			{"keys", "a", `{"name":"a","kind":"ml-dsa-65","primary":1,"latest":1,"created_at":"2026-02-01T00:00:00Z"}`},
			{"versions", "a\x00\x00\x00\x00\x00\x00\x00\x00\x01", `{"number":1,"state":"enabled","created_at":"2026-02-01T00:00:00Z","sealed":"eA=="}`},
			{"tokens", "t1", `{"id":"t1","role":"admin","hash":"aA=="}`},
		}
		for _, p := range puts {
			if err := tx.Bucket([]byte(p.b)).Put([]byte(p.k), []byte(p.v)); err != nil {
				return err
			}
		}
		return nil
	})
	if v, empty, err := bolt.Peek(path, "sealed-under", bolt.Options{}); err != nil || empty || string(v) != `{"token":"kmsd"}` {
		t.Fatalf("peek of a schema-2 file: %q %v %v", v, empty, err)
	}
	if _, err := bolt.Open(path, bolt.Options{Sealer: testhsm.Open(t)}); !errors.Is(err, bolt.ErrUntagged) {
		t.Fatalf("open of a schema-2 file without --upgrade-untagged-store: %v", err)
	}
	s, err := bolt.Open(path, bolt.Options{Sealer: testhsm.Open(t), UpgradeUntagged: true})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if m := s.Migration(); m.From != "2" || m.To != "3" || m.Records != 4 {
		t.Fatalf("migration: %+v", m)
	}
	ctx := context.Background()
	if v, err := s.GetVersion(ctx, "a", 1); err != nil || string(v.Sealed) != "x" {
		t.Fatalf("version after tagging: %+v %v", v, err)
	}
	if tk, err := s.GetToken(ctx, "t1"); err != nil || tk.Role != "admin" {
		t.Fatalf("token after tagging: %+v %v", tk, err)
	}
	if v, err := s.Meta("sealed-under"); err != nil || string(v) != `{"token":"kmsd"}` {
		t.Fatalf("meta after tagging: %q %v", v, err)
	}
	if rep, err := s.Scrub(ctx); err != nil || rep.Records != 5 { // and the audit log's end
		t.Fatalf("scrub after tagging: %+v %v", rep, err)
	}
	s.Close()
	if v, empty, err := bolt.Peek(path, "sealed-under", bolt.Options{}); err != nil || empty || string(v) != `{"token":"kmsd"}` {
		t.Fatalf("peek of a schema-3 file: %q %v %v", v, empty, err)
	}
}
