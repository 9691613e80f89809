DROP TABLE dead_letters;
DROP TABLE consumer_offsets;
