package bolt

import (
	"encoding/json"
	"fmt"

	"github.com/kmsd-project/kmsd/kms"
)

// keyV1 is a key record of schema 1: the header with every version inside.
type keyV1 struct {
	kms.Key
	Versions []kms.Version `json:"versions"`
}

// migration says what Open migrated.
type migration struct {
	From, To       string
	Keys, Versions int
	Records        int // records that got their first tag (schema 1 and 2)
}

// Migration reports what Open migrated (zero if the file was current).
type Migration = migration

// Migration returns what Open migrated.
func (s *Store) Migration() Migration { return s.migrated }

// migrateV1 moves every version out of its key's record into a record of
// its own and rewrites the header with Latest set, inside tx: the whole
// file migrates in one transaction or not at all. Every record is checked
// on the way (versions numbered 1..n in order, primary and
// min_decryption_version among them); one that is not refuses the
// migration, and the file stays as it was.
func migrateV1(r *rtx, m *migration) error {
	keys := r.Bucket(bucketKeys)
	var olds []keyV1
	err := keys.ForEach(func(name, stored []byte) error {
		buf, _, err := r.a.Open(recPath(bucketKeys, name), stored)
		if err != nil {
			return err
		}
		var k keyV1
		if err := json.Unmarshal(buf, &k); err != nil {
			return fmt.Errorf("key record %q: %w", name, err)
		}
		if k.Name != string(name) {
			return fmt.Errorf("key record %q names key %q", name, k.Name)
		}
		if k.Key.Latest != 0 {
			return fmt.Errorf("key record %q already has a latest version (not a schema-1 record)", name)
		}
		n := uint64(len(k.Versions))
		if n == 0 {
			return fmt.Errorf("key record %q has no versions", name)
		}
		for i, v := range k.Versions {
			if v.Number != uint64(i+1) {
				return fmt.Errorf("key record %q: version %d is at position %d", name, v.Number, i+1)
			}
		}
		if k.Primary < 1 || k.Primary > n || k.MinDecryptionVersion > n {
			return fmt.Errorf("key record %q: primary %d or min_decryption_version %d is not one of its %d versions", name, k.Primary, k.MinDecryptionVersion, n)
		}
		olds = append(olds, k)
		return nil
	})
	if err != nil {
		return err
	}
	// Written after the walk: bbolt does not allow changing a bucket while
	// a cursor walks it.
	for i := range olds {
		k := &olds[i]
		h := k.Key
		h.Latest = uint64(len(k.Versions))
		if err := putHeader(r, &h); err != nil {
			return err
		}
		for j := range k.Versions {
			if err := putVersion(r, h.Name, &k.Versions[j], nil); err != nil {
				return err
			}
		}
		m.Keys++
		m.Versions += len(k.Versions)
	}
	return nil
}
