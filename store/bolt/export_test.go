package bolt

import bbolt "go.etcd.io/bbolt"

// EditForTest writes the open file behind the store's back, as another
// process ignoring bbolt's advisory lock would.
func (s *Store) EditForTest(fn func(tx *bbolt.Tx) error) error { return s.db.Update(fn) }
